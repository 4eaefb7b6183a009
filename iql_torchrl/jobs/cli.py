"""The command line of a job (``examples/iql_offline.py``, ``examples/iql_finetune.py``).

Flags from the job's config class (tyro), the job run on them, and for the console: no library log
lines, a bad setting or a refused run as one ``error:`` line and exit status 2, a run stopped by
Ctrl-C as the one line it printed and exit status 130, and a short human summary at the end (the
full one is the run folder's ``summary.json``).
"""
from __future__ import annotations

import logging
import sys

import torch

from iql_torchrl.runs.config import parse_cli
from iql_torchrl.runs.interrupt import INTERRUPTED_STATUS, RunInterrupted
from iql_torchrl.runs.report import console_summary
from iql_torchrl.runs.run import USER_ERRORS

__all__ = ["run_job", "quiet_library_logs"]


def quiet_library_logs() -> None:
    """Keeps TorchRL's informational log lines (storage initialisation …) off the console."""
    logging.getLogger("torchrl").setLevel(logging.WARNING)


def run_job(config_cls, job, argv: list[str] | None = None) -> int:
    """Parses ``argv`` into ``config_cls``, runs ``job(config, given)``; returns the exit status."""
    quiet_library_logs()
    config, given = parse_cli(config_cls, argv)
    try:
        summary = job(config, given)
    except USER_ERRORS as err:  # bad settings, a folder in use, a refused resume, a non-finite loss …
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunInterrupted:  # Ctrl-C, checkpointed: the run printed how to continue
        return INTERRUPTED_STATUS
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if summary:  # under torchrun only rank 0 returns one
        print(console_summary(summary, summary["run_dir"]))
    return 0
