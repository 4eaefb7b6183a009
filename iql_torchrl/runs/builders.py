"""What a run's config builds besides the networks' own wiring: the update step's options, the batch
draws, and a saved run's loss and policy rebuilt.

``examples/iql_offline.py`` builds its networks and IQLLoss in view (``make_loss``); :func:`build_loss`
builds the same from a saved config for fine-tuning, evaluation and export (a difference fails
loading the checkpoint, naming the parameters that do not match).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from iql_torchrl.runs.checkpoint import load_run_checkpoint
from iql_torchrl.runs.config import RunConfig, config_from_dict
from iql_torchrl.data import OfflineDataMetadata, sample_indices
from iql_torchrl.objectives.discrete import DiscreteIQLLoss
from iql_torchrl.runs.distributed import all_reduce_gradients
from iql_torchrl.runs.settings import resolve_precision, resolved_device
from iql_torchrl.runs.sweep import sweep_grid
from iql_torchrl.objectives.ensemble import SeedEnsemble
from iql_torchrl.objectives.loss import IQLLoss
from iql_torchrl.objectives.networks import make_iql_networks
from iql_torchrl.step.update import IQLUpdate

__all__ = ["build_loss", "build_seed_losses", "make_update", "update_options", "batch_generators", "index_sampler", "load_actor",
           "actor_from_checkpoint", "loss_from_checkpoint", "RANK_SEED_STRIDE"]

RANK_SEED_STRIDE = 1_000_003  # keeps the ranks' batch streams apart


def build_loss(config: RunConfig, metadata: OfflineDataMetadata) -> IQLLoss:
    """The networks and loss a run trains, from its (resolved) config and the data's metadata.

    Box actions: :class:`IQLLoss` with the paper's Gaussian actor (or ``--actor deterministic``). Discrete actions:
    :class:`DiscreteIQLLoss` with a categorical actor over ``metadata.num_actions`` (one-hot when
    the data stores one-hot actions) and one Q value per action.
    """
    actor, critics, value = make_iql_networks(
        metadata.observation_dim,
        metadata.action_dim,
        actor_kind=config.actor_kind(metadata),
        hidden_sizes=tuple(config.hidden_sizes),
        actor_dropout=config.actor_dropout,
    )
    hyperparameters = dict(temperature=config.temperature, expectile=config.expectile)
    if metadata.discrete:
        loss = DiscreteIQLLoss(actor, critics, value, action_space=metadata.actor_kind, **hyperparameters)
    else:
        loss = IQLLoss(actor, critics, value, **hyperparameters)
    loss.make_value_estimator(gamma=config.gamma)
    return loss.to(config.device)


def build_seed_losses(config: RunConfig, metadata: OfflineDataMetadata, seeds: list[int], device) -> IQLLoss | SeedEnsemble:
    """The loss of one seed, or a :class:`SeedEnsemble` of several; each seed initialised exactly as
    a single-seed run of that seed would be."""
    losses = []
    for seed in seeds:
        torch.manual_seed(seed)
        losses.append(build_loss(config, metadata).to(device))
    return losses[0] if len(losses) == 1 else SeedEnsemble(losses)


def make_update(config: RunConfig, loss, data, *, total_steps: int | None, distributed: bool = False) -> IQLUpdate:
    """The fused update step a run's config asks for (``total_steps=None``: constant learning rates)."""
    return IQLUpdate(loss, lr=config.lr, tau=config.tau, total_steps=total_steps, order=config.order, data=data,
                     **update_options(config, loss, distributed))


def update_options(config: RunConfig, loss, distributed: bool = False) -> dict:
    """:class:`IQLUpdate`'s keyword arguments for how a run's step runs: the mode (``--compile``,
    ``--cudagraphs``), the precision, the torchrun gradient all-reduce, what a
    compiled step that fails its eager check does (the run continues eager where the step was its own choice,
    and stops where it was forced) and the optimiser settings that differ from IQLUpdate's defaults.

    ``--precision auto`` is resolved here, measured for ``loss``'s own layers (and with ``--threads auto`` a
    bf16 step may take one thread): :func:`~iql_torchrl.runs.settings.resolve_precision`."""
    resolve_precision(config, loss, distributed)
    return dict(
        mode="cudagraphs" if config.cudagraphs else "compile" if config.compile else "eager",
        precision=config.precision, grad_hook=all_reduce_gradients if distributed else None,
        fall_back_to_eager=config.step_chosen, **config.optimizer_settings(),
    )


def batch_generators(seeds: list[int], rank: int, device) -> list[torch.Generator]:
    """One batch stream per seed and per rank; rank 0 of seed s draws what a single process would."""
    return [torch.Generator(device=device).manual_seed(seed + RANK_SEED_STRIDE * rank) for seed in seeds]


def index_sampler(generators: list[torch.Generator], num_transitions: int, batch_size: int, device):
    """Draws one batch of indices per generator (one per seed): ``[B]`` for one seed, ``[K, B]`` for K."""
    def draw() -> torch.Tensor:
        indices = [sample_indices(num_transitions, batch_size, g, device) for g in generators]
        return indices[0] if len(indices) == 1 else torch.stack(indices)

    return draw


def load_actor(run_dir: str | Path, device: str = "cpu", seed_index: int = 0):
    """The trained policy of a run (offline or fine-tuned) as a plain TorchRL module, and the data metadata it needs.

    ``actor(TensorDict({"observation": obs}, batch))`` writes ``"action"`` in the buffer's action
    space; ``metadata.action_to_env`` maps it to the environment's bounds. ``obs`` is as the buffer stores it:
    ``metadata.observation_from_env(env_obs)``; where the run standardised observations
    (``--normalize-observations``), ``TensorDictSequential(metadata.observation_norm(), actor)`` is the policy
    on the environment's flattened observations (TorchRL's ``ObservationNorm`` with the checkpoint's statistics). For a run of several
    seeds, ``seed_index`` picks one (0 is ``--seed``). ``device`` (cpu, cuda or auto) is checked
    before anything loads (:func:`~iql_torchrl.runs.settings.resolved_device`). The checkpoint loads with ``weights_only=True``
    (no code runs), falling back to ``checkpoint.prev.pt`` when the last is unreadable.
    """
    device = resolved_device(device)
    return actor_from_checkpoint(load_run_checkpoint(run_dir, map_location="cpu"), device, seed_index)


def actor_from_checkpoint(state: dict, device: str = "cpu", seed_index: int = 0):
    """:func:`load_actor` on a checkpoint already read: ``(actor, metadata)`` on ``device``. ``seed_index`` counts
    the members of a run of several (seeds, or ``--sweep`` settings × seeds, setting-major)."""
    loss, metadata = loss_from_checkpoint(state, device, seed_index)
    return loss.get_stateful_net("actor_network", copy=True).eval(), metadata


def loss_from_checkpoint(state: dict, device: str = "cpu", seed_index: int = 0):
    """Member ``seed_index``'s loss of a checkpoint already read (its networks and target critics, its β and τ) and
    the data metadata: ``(loss, metadata)`` on ``device``, the loss ready to evaluate (nothing updates its targets)."""
    saved = state["config"]
    config = config_from_dict(RunConfig, saved)
    config.device, config.output_dir = device, None
    settings = [setting for setting in sweep_grid(saved.get("sweep")) for _ in range(saved.get("num_seeds", 1))]  # each member's
    metadata = OfflineDataMetadata.from_state_dict(state["metadata"])
    if not 0 <= seed_index < len(settings):
        raise ValueError(f"seed_index must be in [0, {len(settings)}) for this run, got {seed_index}.")
    if len(settings) > 1:
        loss = SeedEnsemble([build_loss(replace(config, **setting), metadata) for setting in settings])
    else:
        loss = build_loss(replace(config, **settings[0]), metadata)
    loss.claim_target_update()  # nothing updates the targets of a loss built to be read
    loss.load_state_dict(state["loss"])  # tensors saved on any device land on this one
    return (loss.seed_loss(seed_index) if len(settings) > 1 else loss), metadata
