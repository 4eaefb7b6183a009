"""The TorchRL logger a run writes its metrics to (``--logger csv|wandb|tensorboard|none``)."""
from __future__ import annotations

import os
from pathlib import Path

from iql_torchrl.runs.config import config_to_dict
from iql_torchrl.runs.folder import RunFolder

__all__ = ["make_logger", "log_values", "EVALUATION_KEYS"]

EVALUATION_KEYS = ("return_mean", "normalized_score", "success_rate")


def make_logger(config, folder: RunFolder, resumed_at: int | None = None, evaluates_again: bool = False,
                wandb_id: str | None = None):
    """The TorchRL logger ``--logger`` names, writing under the run ``folder`` (``None`` for ``none``).

    ``resumed_at``: the update a resumed run goes on from (``evaluates_again``: it first redoes that update's
    evaluation). TorchRL's CSV logger appends to the files it finds, so their rows the run is about to write
    again are dropped first (:func:`drop_rows_logged_again`), and TensorBoard is told to hide them
    (:func:`purging_writer`). ``wandb_id``: the W&B run a resumed run goes on in."""
    if config.logger == "none":
        return None
    from torchrl.record.loggers import CSVLogger, TensorboardLogger, WandbLogger

    output_dir = folder.path
    name = output_dir.name
    if config.logger == "csv":
        if resumed_at is not None:
            drop_rows_logged_again(folder, Path("logs", name, "scalars"), resumed_at, evaluates_again)
        return CSVLogger(exp_name=name, log_dir=str(output_dir / "logs"))
    if config.logger == "tensorboard":
        logger = TensorboardLogger(exp_name=name, log_dir=str(output_dir / "logs"))
        if resumed_at is not None:
            logger.experiment = purging_writer(logger.experiment, resumed_at)
        return logger
    # WANDB_MODE where set, else offline without an API key; given to this run's wandb.init, not through TorchRL's
    # `offline`, which sets WANDB_MODE for the whole process (and wandb keeps the first run's mode for the next)
    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    return WandbLogger(exp_name=name, save_dir=str(output_dir), id=wandb_id, project="iql_torchrl", mode=mode,
                       config=config_to_dict(config))


def purging_writer(writer, step: int):
    """``writer`` (a ``SummaryWriter``) closed and reopened on its folder with ``purge_step``: TensorBoard then hides
    the events the earlier session logged after update ``step``, which a run resumed at ``step`` logs again. The purge
    spans every tag, so a redone evaluation of update ``step`` (``evaluates_again``) shows twice at that update."""
    from torch.utils.tensorboard import SummaryWriter

    writer.close()
    return SummaryWriter(log_dir=writer.log_dir, purge_step=step + 1)


def drop_rows_logged_again(folder: RunFolder, scalars: Path, step: int, evaluates_again: bool) -> None:
    """Drops from the CSV files in ``scalars`` (inside ``folder``) the rows a run resumed at update ``step`` writes
    again: those of later updates (logged before the run stopped, after its checkpoint), and that update's
    evaluation where the checkpoint was written before it. Each file is replaced whole, never left half written."""
    for path in sorted((folder.path / scalars).glob("*.csv")):
        last = step - 1 if evaluates_again and path.stem in EVALUATION_KEYS else step
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if not _row_after(line, last)]
        if len(kept) < len(lines):
            folder.write_text_atomic(scalars / path.name, "".join(kept))


def _row_after(line: str, last: int) -> bool:
    """Whether a CSV row ``step,value`` belongs to an update after ``last`` (a row of another form is kept)."""
    head = line.split(",", 1)[0]
    return head.strip().isdigit() and int(head) > last


def log_values(logger, values: dict, step: int) -> None:
    if logger is None:
        return
    for key, value in values.items():
        logger.log_scalar(key, value, step=step)
