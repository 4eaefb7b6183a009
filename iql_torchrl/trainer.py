"""The offline IQL job: data → networks → fused update loop → evaluation → summary.

:class:`Config` is the run configuration (``examples/iql_offline.py`` turns it into the command
line with tyro); :func:`train` runs it on the run harness (:class:`~iql_torchrl.run.Run`: locked
run folder, checked resume, logger, progress bar, checkpoints before every evaluation, non-finite
guard, the loop :func:`~iql_torchrl.run.offline_loop`) and returns the summary it writes to
``output_dir/summary.json``. The builders it uses are :mod:`iql_torchrl.build`'s.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

# the builders' and the loop's former home: users' scripts import them from here
from iql_torchrl.build import (  # noqa: F401
    RANK_SEED_STRIDE,
    batch_generators,
    build_loss,
    build_seed_losses,
    index_sampler,
    load_actor,
    make_update,
)
from iql_torchrl.config import PRESETS, ConfigError, RunConfig
from iql_torchrl.data import buffer_transitions
from iql_torchrl.distributed import broadcast_parameters
from iql_torchrl.run import NonFiniteLossError, Run, offline_loop

__all__ = ["Config", "PRESETS", "train", "offline_loop", "NonFiniteLossError", "build_loss", "load_actor",
           "make_update", "index_sampler", "offline_summary"]

@dataclass
class Config(RunConfig):
    """Offline IQL on a Minari dataset."""

    steps: int = 10_000
    """Gradient steps (each updates V, the actor and both critics). The paper runs 1M on D4RL."""
    num_seeds: int = 1
    """Train seeds seed … seed+K−1 at once, vmapped in one process; results per seed and mean ± std."""

    def total_updates(self) -> int:
        return self.steps

    def check(self) -> None:
        super().check()
        self.check_integers(1, "steps", "num_seeds")
        if self.num_seeds > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("--num-seeds cannot be combined with torchrun: run the seeds in one process, or one seed per run.")


# ---------------------------------------------------------------------------------------- train
def train(config: Config, given: set[str] | None = None) -> dict:
    """Runs the configured offline IQL training and returns (and writes) its summary.

    With ``resume=True`` the run in ``output_dir`` continues with the configuration saved in its
    checkpoint and ends with the same parameters as an uninterrupted run; a setting in ``given``
    (default: those that differ from the defaults) that differs from the checkpoint's refuses to
    resume (see :mod:`iql_torchrl.resume`). ``num_seeds=K`` trains seeds ``seed … seed+K−1`` as
    one vmapped ensemble. Under ``torchrun`` every process trains on its own batches with
    gradients averaged across processes; rank 0 alone builds the dataset, logs, evaluates,
    checkpoints and writes the summary. ``examples/iql_offline.py`` spells out the same steps.
    """
    with Run.begin(config, job="offline", given=given) as run:
        if run.finished:
            return run.finished_summary()
        config, ctx = run.config, run.ctx
        data = buffer_transitions(run.load_data())
        seeds = [config.seed + k for k in range(config.num_seeds)]
        loss = build_seed_losses(config, run.metadata, seeds, run.device)
        if ctx.enabled:
            broadcast_parameters(loss)
        update = make_update(config, loss, data, total_steps=config.steps, distributed=ctx.enabled)
        generators = batch_generators(seeds, ctx.rank, run.device)
        run.attach(loss, update, generators, seeds)
        run.evaluate_if_pending()
        offline_loop(run, update, index_sampler(generators, data.batch_size[0], config.batch_size, run.device), config.steps)

        return run.finish(*offline_summary(run, update))


def offline_summary(run: Run, update) -> tuple[dict, str]:
    """The offline job's summary and the title of its learning curve."""
    config, ctx = run.config, run.ctx
    summary = {
        "dataset": config.dataset, "steps": config.steps, "seed": config.seed, "num_seeds": config.num_seeds,
        "temperature": config.temperature, "expectile": config.expectile, "preset": config.preset,
        "order": config.order, "mode": update.mode, "device": config.device, "batch_size": config.batch_size,
        "world_size": ctx.world_size, "global_batch_size": config.batch_size * ctx.world_size,
        **(run.summary_fields() if ctx.is_main else {}),
    }
    seeds = run.seeds
    seeds_label = f"seed {config.seed}" if len(seeds) == 1 else f"seeds {seeds[0]}–{seeds[-1]}, mean"
    return summary, f"IQL on {config.dataset} ({seeds_label})"
