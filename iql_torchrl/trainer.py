"""The offline IQL trainer: data → networks → fused update loop → evaluation → summary.

:class:`Config` is the whole run configuration (``examples/iql_offline.py`` turns it into the
command line with tyro); :func:`train` runs it and returns the summary it writes to
``output_dir/summary.json``. The loop shows a tqdm bar (updates/s, last score), evaluates
every ``eval_every`` updates, logs through TorchRL's loggers, checkpoints atomically and resumes
exactly (``resume=True``), and stops with a clear message when a loss turns non-finite.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

import iql_torchrl
from iql_torchrl.checkpoint import CHECKPOINT_NAME, capture_rng, load_checkpoint, restore_rng, save_checkpoint
from iql_torchrl.data import OfflineDataMetadata, buffer_transitions, load_minari_dataset, sample_indices
from iql_torchrl.datasets import BUILDERS, DEFAULT_DATASET, ensure_dataset
from iql_torchrl.distributed import SeedEnsemble, all_reduce_gradients, broadcast_parameters, setup_distributed
from iql_torchrl.evaluation import evaluate_policy
from iql_torchrl.loss import IQLLoss
from iql_torchrl.models import make_iql_networks
from iql_torchrl.update import IQLUpdate, metrics_to_floats

__all__ = ["Config", "PRESETS", "train", "NonFiniteLossError", "build_loss", "load_actor"]


@dataclass(frozen=True)
class Preset:
    """The paper's per-domain hyperparameters (appendix B)."""

    expectile: float
    temperature: float
    actor_dropout: float
    reward_transform: str


PRESETS = {
    "mujoco": Preset(expectile=0.7, temperature=3.0, actor_dropout=0.0, reward_transform="locomotion"),
    "antmaze": Preset(expectile=0.9, temperature=10.0, actor_dropout=0.0, reward_transform="antmaze"),
    "kitchen": Preset(expectile=0.7, temperature=0.5, actor_dropout=0.1, reward_transform="none"),
    "adroit": Preset(expectile=0.7, temperature=0.5, actor_dropout=0.1, reward_transform="none"),
}


@dataclass
class Config:
    """Offline IQL on a Minari dataset."""

    dataset: str = DEFAULT_DATASET
    """Minari dataset id. Ids of the local builders (``python -m iql_torchrl.datasets list``) are built on first use."""
    steps: int = 10_000
    """Gradient steps (each updates V, the actor and both critics). The paper runs 1M on D4RL."""
    batch_size: int = 256
    """Transitions per update (per process)."""
    seed: int = 0
    """Seed of the network initialisation, the batch draws and the evaluation episodes."""
    num_seeds: int = 1
    """Train seeds seed … seed+K−1 at once, vmapped in one process; results per seed and mean ± std."""
    eval_every: int = 2_000
    """Evaluate every this many updates (and always at the end)."""
    eval_episodes: int = 10
    """Episodes per evaluation, stepped in parallel."""
    temperature: float | None = None
    """β, the AWR inverse temperature (0 is behaviour cloning). Default: the preset's."""
    expectile: float | None = None
    """τ, the value expectile. Default: the preset's."""
    preset: Literal["mujoco", "antmaze", "kitchen", "adroit"] = "mujoco"
    """The paper's per-domain τ, β, actor dropout and reward transform."""
    device: Literal["cpu", "cuda", "auto"] = "auto"
    """Training device; auto picks cuda when available."""
    compile: bool = False
    """torch.compile the whole update step."""
    cudagraphs: bool = False
    """Capture the compiled step in a CUDA graph (needs CUDA)."""
    bf16: bool = False
    """Compute the losses under bfloat16 autocast (parameters and optimizer stay float32)."""
    order: Literal["paper", "summed"] = "paper"
    """Update order: step V first, then the actor and Q with the new V (paper); or one summed backward."""
    logger: Literal["csv", "wandb", "tensorboard", "none"] = "csv"
    """TorchRL logger; wandb runs offline when no API key is set."""
    output_dir: Path | None = None
    """Run folder (checkpoint, logs, summary.json, curve PNG). Default: runs/<dataset>-seed<seed>-<time>."""
    resume: bool = False
    """Continue the run in --output-dir from its checkpoint."""
    checkpoint_every: int = 5_000
    """Write the checkpoint every this many updates (and at the end)."""
    log_every: int = 500
    """Read metrics to the host and log them every this many updates."""
    hidden_sizes: tuple[int, ...] = (256, 256)
    """Hidden layer widths of every network."""
    lr: float = 3e-4
    """Adam learning rate (the actor's decays to 0 with a cosine over the run)."""
    tau: float = 0.005
    """Soft target update rate of the critics."""
    gamma: float = 0.99
    """Discount."""
    normalize_observations: bool = False
    """Standardise observations with the dataset's statistics (saved in the checkpoint)."""
    progress: bool = True
    """Show the progress bar."""

    def resolved(self) -> Config:
        """A copy with the preset's values filled in and the device chosen."""
        preset = PRESETS[self.preset]
        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        out = Config(**asdict(self))
        out.temperature = preset.temperature if self.temperature is None else self.temperature
        out.expectile = preset.expectile if self.expectile is None else self.expectile
        out.device = device
        return out


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or inf; the last checkpoint (written before it) is intact."""


# ---------------------------------------------------------------------------------------- helpers
def build_loss(config: Config, metadata: OfflineDataMetadata) -> IQLLoss:
    """The networks and loss the run trains, from its (resolved) config and the data's metadata."""
    actor, critics, value = make_iql_networks(
        metadata.observation_dim,
        metadata.action_dim,
        hidden_sizes=tuple(config.hidden_sizes),
        actor_dropout=PRESETS[config.preset].actor_dropout,
    )
    loss = IQLLoss(actor, critics, value, temperature=config.temperature, expectile=config.expectile)
    loss.make_value_estimator(gamma=config.gamma)
    return loss.to(config.device)


def load_actor(run_dir: str | Path, device: str = "cpu", seed_index: int = 0):
    """The trained policy of a run as a plain TorchRL module, and the data metadata it needs.

    ``actor(TensorDict({"observation": obs}, batch))`` writes ``"action"`` in the buffer's action
    space; ``metadata.action_to_env`` maps it to the environment's bounds. For a run of several
    seeds, ``seed_index`` picks one (0 is ``--seed``).
    """
    state = load_checkpoint(Path(run_dir) / CHECKPOINT_NAME, map_location=device)
    config = Config(**{**state["config"], "output_dir": None, "device": device})
    config.hidden_sizes = tuple(config.hidden_sizes)
    metadata = OfflineDataMetadata.from_state_dict(state["metadata"])
    if not 0 <= seed_index < config.num_seeds:
        raise ValueError(f"seed_index must be in [0, {config.num_seeds}) for this run, got {seed_index}.")
    if config.num_seeds > 1:
        ensemble = SeedEnsemble([build_loss(config, metadata) for _ in range(config.num_seeds)])
        ensemble.load_state_dict(state["loss"])
        loss = ensemble.seed_loss(seed_index)
    else:
        loss = build_loss(config, metadata)
        loss.load_state_dict(state["loss"])
    return loss.get_stateful_net("actor_network", copy=True).eval(), metadata


def _default_output_dir(config: Config) -> Path:
    name = config.dataset.replace("/", "_")
    return Path("runs") / f"{name}-seed{config.seed}-{time.strftime('%Y%m%d-%H%M%S')}"


def _make_logger(config: Config, output_dir: Path):
    if config.logger == "none":
        return None
    from torchrl.record.loggers import CSVLogger, TensorboardLogger, WandbLogger

    name = output_dir.name
    if config.logger == "csv":
        return CSVLogger(exp_name=name, log_dir=str(output_dir / "logs"))
    if config.logger == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError as err:
            raise ImportError(
                "--logger tensorboard needs the tensorboard package: pip install 'iql_torchrl[tensorboard]'."
            ) from err
        return TensorboardLogger(exp_name=name, log_dir=str(output_dir / "logs"))
    offline = not os.environ.get("WANDB_API_KEY") and os.environ.get("WANDB_MODE") != "online"
    return WandbLogger(
        exp_name=name,
        save_dir=str(output_dir),
        project="iql_torchrl",
        offline=offline,
        config=_jsonable(asdict(config)),
    )


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))


def _log(logger, values: dict, step: int) -> None:
    if logger is None:
        return
    for key, value in values.items():
        logger.log_scalar(key, value, step=step)


def plot_curve(curve: list[dict], path: Path, title: str, phase_boundary: int | None = None) -> None:
    """Normalized score against updates, with the random (0) and expert (100) references.

    ``phase_boundary`` (an update count) draws a vertical line where online fine-tuning starts.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot([p["step"] for p in curve], [p["normalized_score"] for p in curve], marker="o", label="IQL")
    ax.axhline(100, color="tab:green", ls="--", lw=1, label="expert (100)")
    ax.axhline(0, color="tab:red", ls="--", lw=1, label="random (0)")
    if phase_boundary is not None:
        ax.axvline(phase_boundary, color="black", ls=":", lw=1.5, label="offline | online")
    ax.set_xlabel("updates")
    ax.set_ylabel("normalized score")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------- train
def train(config: Config) -> dict:
    """Runs the configured offline IQL training and returns (and writes) its summary.

    With ``resume=True`` the run in ``output_dir`` continues with the configuration saved in its
    checkpoint (the other fields of ``config`` are ignored) and ends with the same parameters as
    an uninterrupted run. ``num_seeds=K`` trains seeds ``seed … seed+K−1`` as one vmapped
    ensemble. Under ``torchrun`` every process trains on its own batches with gradients averaged
    across processes; rank 0 alone builds the dataset, logs, evaluates, checkpoints and writes
    the summary.
    """
    state = None
    if config.resume:
        state = _checkpoint_to_resume(config)
        config = Config(**{**state["config"], "resume": True, "progress": config.progress})
        config.hidden_sizes = tuple(config.hidden_sizes)
    config = config.resolved()
    _check_config(config)
    ctx = setup_distributed(config.device)
    if state is not None and state.get("world_size", 1) != ctx.world_size:
        raise ValueError(f"This run was checkpointed with {state.get('world_size', 1)} processes; resume it with as many.")
    device = f"cuda:{ctx.local_rank}" if config.device == "cuda" and ctx.enabled else config.device
    output_dir = _shared_output_dir(config, ctx)
    seeds = [config.seed + k for k in range(config.num_seeds)]

    if config.dataset in BUILDERS:
        if ctx.is_main:
            ensure_dataset(config.dataset, progress=config.progress)
        ctx.barrier()  # the other ranks wait until rank 0 has built it
    buffer = load_minari_dataset(
        config.dataset,
        batch_size=config.batch_size,
        device=device,
        reward_transform=PRESETS[config.preset].reward_transform,
        normalize_observations=config.normalize_observations,
    )
    metadata = buffer.metadata
    data = buffer_transitions(buffer)
    num_transitions = data.batch_size[0]

    losses = []
    for seed in seeds:  # each seed initialised exactly as a single-seed run would be
        torch.manual_seed(seed)
        losses.append(build_loss(config, metadata).to(device))
    loss = losses[0] if len(losses) == 1 else SeedEnsemble(losses)
    if ctx.enabled:
        broadcast_parameters(loss)
    mode = "cudagraphs" if config.cudagraphs else "compile" if config.compile else "eager"
    update = IQLUpdate(
        loss, total_steps=config.steps, lr=config.lr, tau=config.tau, order=config.order, mode=mode, data=data,
        autocast_dtype=torch.bfloat16 if config.bf16 else None, grad_hook=all_reduce_gradients if ctx.enabled else None,
    )
    # one batch stream per seed and per rank; rank 0 of seed s draws what a single process would
    generators = [torch.Generator(device=device).manual_seed(seed + _RANK_SEED_STRIDE * ctx.rank) for seed in seeds]

    def draw_indices() -> torch.Tensor:
        indices = [sample_indices(num_transitions, config.batch_size, g, device) for g in generators]
        return indices[0] if len(indices) == 1 else torch.stack(indices)

    start, curve, train_seconds = 0, [], 0.0
    checkpoint_path = output_dir / CHECKPOINT_NAME
    if state is not None:
        loss.load_state_dict(state["loss"])
        update.load_state_dict(state["update"])
        restore_rng(state["rng"][ctx.rank], generators)
        start, curve, train_seconds = state["step"], state["curve"], state["train_seconds"]
    logger = _make_logger(config, output_dir) if ctx.is_main else None

    def checkpoint(step: int) -> None:
        _raise_if_nonfinite(update)  # never write non-finite parameters
        if not all(torch.isfinite(p).all() for p in loss.parameters()):
            raise NonFiniteLossError(
                f"Training stopped: parameters became non-finite in update step {step - 1}. "
                "The last checkpoint (written before it) is intact; try a lower --lr."
            )
        rng = [capture_rng(generators)]
        if ctx.enabled:  # every rank's batch stream, so each resumes its own
            rng = [None] * ctx.world_size
            torch.distributed.all_gather_object(rng, capture_rng(generators))
        if not ctx.is_main:
            return
        save_checkpoint(
            checkpoint_path,
            {
                "loss": loss.state_dict(),
                "update": update.state_dict(),
                "rng": rng,
                "world_size": ctx.world_size,
                "step": step,
                "curve": curve,
                "train_seconds": train_seconds,
                "metadata": metadata.state_dict(),
                "config": _jsonable(asdict(config)),
                "version": iql_torchrl.__version__,
            },
        )

    def evaluate(step: int) -> dict:
        results = []
        for k, seed in enumerate(seeds):
            seed_loss = loss if len(seeds) == 1 else loss.seed_loss(k)
            actor = seed_loss.get_stateful_net("actor_network", copy=True).eval()
            result = evaluate_policy(actor, metadata, episodes=config.eval_episodes, seed=seed + 10_000, device=device)
            results.append({"seed": seed, **result})
        summary = _seed_summary(results)
        curve.append({"step": step, **{k: summary[k] for k in ("normalized_score", "return_mean", "per_seed")}})
        _log(logger, {k: summary[k] for k in ("return_mean", "normalized_score") if summary[k] is not None}, step)
        return summary

    bar = tqdm(
        total=config.steps, initial=start, desc="IQL", unit="upd", mininterval=1.0, dynamic_ncols=True,
        disable=not (config.progress and ctx.is_main),
    )
    timed_from, timed_steps, last_eval = None, 0, None
    wall_start = time.perf_counter()
    for step in range(start + 1, config.steps + 1):
        if timed_from is None and step > start + (1 if mode != "eager" else 0):
            timed_from = time.perf_counter()  # compile warm-up excluded from updates/s
        metrics = update(draw_indices())
        timed_steps += timed_from is not None
        bar.update(1)
        log_now = step % config.log_every == 0 or step == config.steps
        eval_now = step % config.eval_every == 0 or step == config.steps
        ckpt_now = step % config.checkpoint_every == 0 or step == config.steps
        if log_now or eval_now or ckpt_now:
            values = metrics_to_floats(metrics)  # the one host sync of the interval
            _raise_if_nonfinite(update)
            if timed_from is not None:
                train_seconds += time.perf_counter() - timed_from
            _log(logger, values, step)
            if eval_now and ctx.is_main:
                last_eval = evaluate(step)
            if ckpt_now:
                checkpoint(step)
            rate = timed_steps / train_seconds if train_seconds > 0 else float("nan")
            postfix = {"upd/s": f"{rate:.0f}", "loss_q": f"{values['loss_qvalue']:.3g}"}
            if curve:
                postfix["score"] = f"{curve[-1]['normalized_score']:.1f}"
            bar.set_postfix(postfix)
            timed_from = time.perf_counter()
    bar.close()
    if not ctx.is_main:
        ctx.barrier()  # rank 0 finishes the run
        return {}

    if last_eval is None:  # resumed a finished run
        last_eval = evaluate(config.steps)
    summary = {
        "dataset": config.dataset,
        "steps": config.steps,
        "seed": config.seed,
        "num_seeds": config.num_seeds,
        "temperature": config.temperature,
        "expectile": config.expectile,
        "preset": config.preset,
        "order": config.order,
        "mode": mode,
        "device": config.device,
        "batch_size": config.batch_size,
        "world_size": ctx.world_size,
        "global_batch_size": config.batch_size * ctx.world_size,
        **{k: last_eval[k] for k in ("normalized_score", "normalized_score_std", "return_mean", "return_std", "per_seed")},
        "eval_episodes": config.eval_episodes,
        "updates_per_second": timed_steps / train_seconds if train_seconds > 0 else None,
        "wall_seconds": time.perf_counter() - wall_start,
        "curve": curve,
        "version": iql_torchrl.__version__,
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    seeds_label = f"seed {config.seed}" if len(seeds) == 1 else f"seeds {seeds[0]}–{seeds[-1]}, mean"
    plot_curve(curve, output_dir / "learning_curve.png", f"IQL on {config.dataset} ({seeds_label})")
    if logger is not None and hasattr(logger, "experiment") and config.logger == "wandb":
        logger.experiment.finish()
    ctx.barrier()
    return summary


_RANK_SEED_STRIDE = 1_000_003  # keeps the ranks' batch streams apart


def _seed_summary(results: list[dict]) -> dict:
    """Mean over seeds of the per-seed evaluations, with each seed's own figures."""
    import statistics

    scores = [r.get("normalized_score") for r in results]
    has_scores = all(s is not None for s in scores)
    returns = [x for r in results for x in r["returns"]]
    return {
        "normalized_score": statistics.fmean(scores) if has_scores else None,
        "normalized_score_std": statistics.pstdev(scores) if has_scores else None,
        "return_mean": statistics.fmean(r["return_mean"] for r in results),
        "return_std": statistics.pstdev(returns),
        "per_seed": [
            {"seed": r["seed"], "normalized_score": r.get("normalized_score"), "return_mean": r["return_mean"]}
            for r in results
        ],
    }


def _check_config(config: Config) -> None:
    if config.cudagraphs and config.device != "cuda":
        raise ValueError("--cudagraphs needs CUDA (--device cuda on a machine with a GPU).")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here; use --device cpu (or auto).")
    if config.steps <= 0 or config.batch_size <= 0 or config.num_seeds <= 0:
        raise ValueError("--steps, --batch-size and --num-seeds must be positive.")
    if config.num_seeds > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--num-seeds cannot be combined with torchrun: run the seeds in one process, or one seed per run.")


def _shared_output_dir(config: Config, ctx) -> Path:
    """Rank 0 prepares the run folder; every rank gets its path."""
    path = [str(_prepare_output_dir(config))] if ctx.is_main else [None]
    if ctx.enabled:
        torch.distributed.broadcast_object_list(path, src=0)
    return Path(path[0])


def _checkpoint_to_resume(config: Config) -> dict:
    if config.output_dir is None:
        raise ValueError("--resume needs --output-dir: the run folder to continue.")
    path = Path(config.output_dir) / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no {CHECKPOINT_NAME} in {config.output_dir}.")
    state = load_checkpoint(path, map_location="cpu")
    state["config"]["output_dir"] = str(config.output_dir)
    return state


def _prepare_output_dir(config: Config) -> Path:
    if config.resume:
        return Path(config.output_dir)
    output_dir = Path(config.output_dir) if config.output_dir is not None else _default_output_dir(config)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(
            f"{output_dir} already exists: pass --resume to continue that run, or choose another --output-dir."
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    return output_dir


def _raise_if_nonfinite(update: IQLUpdate) -> None:
    report = update.nonfinite_report()
    if report is not None:
        raise NonFiniteLossError(
            f"Training stopped: {report}. The last checkpoint (written before it) is intact; "
            "try a lower --lr or check the dataset for extreme values."
        )
