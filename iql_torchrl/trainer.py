"""The offline IQL trainer: data → networks → fused update loop → evaluation → summary.

:class:`Config` is the run configuration (``examples/iql_offline.py`` turns it into the command
line with tyro); :func:`train` runs it on the run harness (:class:`~iql_torchrl.run.Run`: locked
run folder, checked resume, logger, progress bar, checkpoints before every evaluation, non-finite
guard) and returns the summary it writes to ``output_dir/summary.json``. :func:`offline_loop` is
the update loop itself; fine-tuning runs its offline phase with it too.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from iql_torchrl.checkpoint import load_run_checkpoint
from iql_torchrl.config import PRESETS, ConfigError, RunConfig, config_from_dict
from iql_torchrl.data import OfflineDataMetadata, buffer_transitions, sample_indices
from iql_torchrl.distributed import SeedEnsemble, all_reduce_gradients, broadcast_parameters
from iql_torchrl.discrete import DiscreteIQLLoss
from iql_torchrl.loss import IQLLoss
from iql_torchrl.models import make_iql_networks
from iql_torchrl.run import NonFiniteLossError, Run, restart_progress_clock
from iql_torchrl.update import IQLUpdate

__all__ = ["Config", "PRESETS", "train", "offline_loop", "NonFiniteLossError", "build_loss", "load_actor",
           "make_update", "index_sampler"]

RANK_SEED_STRIDE = 1_000_003  # keeps the ranks' batch streams apart


@dataclass
class Config(RunConfig):
    """Offline IQL on a Minari dataset."""

    steps: int = 10_000
    """Gradient steps (each updates V, the actor and both critics). The paper runs 1M on D4RL."""
    num_seeds: int = 1
    """Train seeds seed … seed+K−1 at once, vmapped in one process; results per seed and mean ± std."""

    def check(self) -> None:
        super().check()
        for name in ("steps", "num_seeds"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {value}: must be an integer >= 1.")
        if self.num_seeds > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("--num-seeds cannot be combined with torchrun: run the seeds in one process, or one seed per run.")


# ---------------------------------------------------------------------------------------- networks
def build_loss(config: RunConfig, metadata: OfflineDataMetadata) -> IQLLoss:
    """The networks and loss a run trains, from its (resolved) config and the data's metadata.

    Box actions: :class:`IQLLoss` with the paper's Gaussian actor. Discrete actions:
    :class:`DiscreteIQLLoss` with a categorical actor over ``metadata.num_actions`` (one-hot when
    the data stores one-hot actions) and one Q value per action.
    """
    actor_kind = ("one_hot" if metadata.one_hot_actions else "categorical") if metadata.discrete else "gaussian"
    actor, critics, value = make_iql_networks(
        metadata.observation_dim,
        metadata.action_dim,
        actor_kind=actor_kind,
        hidden_sizes=tuple(config.hidden_sizes),
        actor_dropout=PRESETS[config.preset].actor_dropout,
    )
    hyperparameters = dict(temperature=config.temperature, expectile=config.expectile)
    if metadata.discrete:
        loss = DiscreteIQLLoss(actor, critics, value, action_space=actor_kind, **hyperparameters)
    else:
        loss = IQLLoss(actor, critics, value, **hyperparameters)
    loss.make_value_estimator(gamma=config.gamma)
    return loss.to(config.device)


def make_update(config: RunConfig, loss, data, *, total_steps: int | None, distributed: bool = False) -> IQLUpdate:
    """The fused update step a run's config asks for (``total_steps=None``: constant learning rates)."""
    mode = "cudagraphs" if config.cudagraphs else "compile" if config.compile else "eager"
    return IQLUpdate(
        loss, total_steps=total_steps, lr=config.lr, tau=config.tau, order=config.order, mode=mode, data=data,
        autocast_dtype=torch.bfloat16 if config.bf16 else None, grad_hook=all_reduce_gradients if distributed else None,
        **config.optimizer_settings(),
    )


def index_sampler(generators: list[torch.Generator], num_transitions: int, batch_size: int, device):
    """Draws one batch of indices per generator (one per seed): ``[B]`` for one seed, ``[K, B]`` for K."""
    def draw() -> torch.Tensor:
        indices = [sample_indices(num_transitions, batch_size, g, device) for g in generators]
        return indices[0] if len(indices) == 1 else torch.stack(indices)

    return draw


def load_actor(run_dir: str | Path, device: str = "cpu", seed_index: int = 0):
    """The trained policy of a run (offline or fine-tuned) as a plain TorchRL module, and the data metadata it needs.

    ``actor(TensorDict({"observation": obs}, batch))`` writes ``"action"`` in the buffer's action
    space; ``metadata.action_to_env`` maps it to the environment's bounds. For a run of several
    seeds, ``seed_index`` picks one (0 is ``--seed``). The checkpoint loads with
    ``weights_only=True`` (no code runs), falling back to ``checkpoint.prev.pt`` when the last is unreadable.
    """
    state = load_run_checkpoint(run_dir, map_location=device)
    config = config_from_dict(RunConfig, state["config"])
    config.device, config.output_dir = device, None
    num_seeds = state["config"].get("num_seeds", 1)
    metadata = OfflineDataMetadata.from_state_dict(state["metadata"])
    if not 0 <= seed_index < num_seeds:
        raise ValueError(f"seed_index must be in [0, {num_seeds}) for this run, got {seed_index}.")
    if num_seeds > 1:
        ensemble = SeedEnsemble([build_loss(config, metadata) for _ in range(num_seeds)])
        ensemble.load_state_dict(state["loss"])
        loss = ensemble.seed_loss(seed_index)
    else:
        loss = build_loss(config, metadata)
        loss.load_state_dict(state["loss"])
    return loss.get_stateful_net("actor_network", copy=True).eval(), metadata


# ---------------------------------------------------------------------------------------- the loop
def offline_loop(run: Run, update: IQLUpdate, draw_batch, last_step: int, desc: str = "IQL") -> None:
    """Updates from ``run.step`` to ``last_step``: logs every ``log_every``, evaluates every ``eval_every``
    and at ``last_step``, and checkpoints every ``checkpoint_every`` and before every evaluation."""
    first = run.step + 1
    warmup = update.mode != "eager"  # the first compiled call compiles: not counted in updates/s
    bar = run.progress_bar(total=last_step, initial=run.step, desc=f"{desc} (compiling the update step)" if warmup else desc)
    for step in range(first, last_step + 1):
        if step > first or not warmup:
            run.timing.start()
        metrics = update(draw_batch())
        if warmup and step == first:
            restart_progress_clock(bar, desc)  # the bar's rate and ETA leave the compilation out too
        run.step = step
        run.timing.count()
        bar.update(1)
        log_now, checkpoint_now, evaluate_now = run.due(step, last_step)
        if log_now:
            run.read_metrics(metrics)
            if evaluate_now:
                run.checkpoint_and_evaluate()
            elif checkpoint_now:
                run.checkpoint()
            run.show_progress(bar)
    bar.close()


# ---------------------------------------------------------------------------------------- train
def train(config: Config, given: set[str] | None = None) -> dict:
    """Runs the configured offline IQL training and returns (and writes) its summary.

    With ``resume=True`` the run in ``output_dir`` continues with the configuration saved in its
    checkpoint and ends with the same parameters as an uninterrupted run; a setting in ``given``
    (default: those that differ from the defaults) that differs from the checkpoint's refuses to
    resume (see :mod:`iql_torchrl.resume`). ``num_seeds=K`` trains seeds ``seed … seed+K−1`` as
    one vmapped ensemble. Under ``torchrun`` every process trains on its own batches with
    gradients averaged across processes; rank 0 alone builds the dataset, logs, evaluates,
    checkpoints and writes the summary.
    """
    with Run.begin(config, job="offline", given=given) as run:
        if run.finished:
            return run.finished_summary()
        config, ctx = run.config, run.ctx
        data = buffer_transitions(run.load_data())
        seeds = [config.seed + k for k in range(config.num_seeds)]
        losses = []
        for seed in seeds:  # each seed initialised exactly as a single-seed run would be
            torch.manual_seed(seed)
            losses.append(build_loss(config, run.metadata).to(run.device))
        loss = losses[0] if len(losses) == 1 else SeedEnsemble(losses)
        if ctx.enabled:
            broadcast_parameters(loss)
        update = make_update(config, loss, data, total_steps=config.steps, distributed=ctx.enabled)
        # one batch stream per seed and per rank; rank 0 of seed s draws what a single process would
        generators = [torch.Generator(device=run.device).manual_seed(seed + RANK_SEED_STRIDE * ctx.rank) for seed in seeds]
        run.attach(loss, update, generators, seeds)
        run.evaluate_if_pending()
        offline_loop(run, update, index_sampler(generators, data.batch_size[0], config.batch_size, run.device), config.steps)

        summary = {
            "dataset": config.dataset, "steps": config.steps, "seed": config.seed, "num_seeds": config.num_seeds,
            "temperature": config.temperature, "expectile": config.expectile, "preset": config.preset,
            "order": config.order, "mode": update.mode, "device": config.device, "batch_size": config.batch_size,
            "world_size": ctx.world_size, "global_batch_size": config.batch_size * ctx.world_size,
            **(run.summary_fields() if ctx.is_main else {}),
        }
        seeds_label = f"seed {config.seed}" if len(seeds) == 1 else f"seeds {seeds[0]}–{seeds[-1]}, mean"
        return run.finish(summary, f"IQL on {config.dataset} ({seeds_label})")
