"""Offline-to-online fine-tuning: an offline IQL policy keeps learning from its own interaction.

:class:`FinetuneConfig` is the run configuration (``examples/iql_finetune.py`` turns it into the
command line with tyro); :func:`finetune` runs it and returns the summary it writes to
``output_dir/summary.json``. Two phases, one update step (the same :class:`~iql_torchrl.IQLUpdate`
object throughout):

1. offline -- ``offline_steps`` updates on the dataset, exactly as the offline trainer draws them
   (or, with ``checkpoint=DIR``, the offline run saved in DIR: its networks, optimizer moments and
   step count);
2. online -- TorchRL's ``Collector`` (0.14's name for ``SyncDataCollector``) steps ``num_envs``
   copies of the dataset's environment with the stochastic policy, ``frames_per_batch`` env steps
   at a time; they go into the online half of an ``OfflineToOnlineReplayBuffer`` whose other half
   is the offline data, and after each collection the step runs ``utd_ratio`` updates per env
   step on batches with ``online_fraction`` online transitions.

Learning rates stay constant in both phases, as in the official fine-tuning configuration
(``antmaze_finetune_config.py``: ``opt_decay_schedule = None``): a fine-tuned actor must keep
learning. A run started from an offline checkpoint therefore sets the actor's learning rate back to
``lr`` (the offline trainer's cosine has decayed it to ~0) and keeps the optimizers' moments.

Both phases keep the offline trainer's guarantees: tqdm progress, TorchRL loggers, evaluation
(deterministic actions) every ``eval_every`` updates and at the phase boundary and the end,
atomic checkpoints, a clear stop on a non-finite loss, and exact resume (``resume=True``) --
including the collector's counters, the online buffer, every random state and the episodes that
were running (rebuilt by replaying their reset and actions: :class:`~iql_torchrl.online.EpisodeReplay`).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

import torch
from torchrl.collectors import Collector
from tqdm.auto import tqdm

import iql_torchrl
from iql_torchrl.checkpoint import CHECKPOINT_NAME, capture_rng, load_checkpoint, restore_rng, save_checkpoint
from iql_torchrl.data import TRANSITION_KEYS, buffer_transitions, load_minari_dataset, sample_indices
from iql_torchrl.datasets import BUILDERS, ensure_dataset
from iql_torchrl.evaluation import evaluate_policy
from iql_torchrl.online import (
    episode_states,
    make_exploration_policy,
    make_offline_online_buffer,
    make_online_env,
    restore_episodes,
)
from iql_torchrl.trainer import (
    PRESETS,
    Config,
    NonFiniteLossError,
    _jsonable,
    _log,
    _make_logger,
    _raise_if_nonfinite,
    build_loss,
    plot_curve,
)
from iql_torchrl.update import IQLUpdate, metrics_to_floats

__all__ = ["FinetuneConfig", "finetune"]

FINETUNE_DATASET = "iql_torchrl/pendulum/medium-v0"  # offline IQL stays clearly below expert on it


@dataclass
class FinetuneConfig:
    """Offline IQL on a Minari dataset, then online fine-tuning in its environment."""

    dataset: str = FINETUNE_DATASET
    """Minari dataset id (its environment is the one fine-tuned in). Ignored with --checkpoint."""
    offline_steps: int = 2_000
    """Offline gradient steps before any interaction. Ignored with --checkpoint (the run's own steps)."""
    online_steps: int = 4_000
    """Environment steps of the online phase, summed over the environments."""
    checkpoint: Path | None = None
    """Start from this offline run folder (examples/iql_offline.py's --output-dir) instead of training one."""
    num_envs: int = 4
    """Environments stepped by the collector (a TorchRL SerialEnv)."""
    frames_per_batch: int = 200
    """Env steps (over all environments) per collection; the updates follow each collection."""
    utd_ratio: float = 1.0
    """Updates per environment step (the paper: 1)."""
    online_fraction: float = 0.5
    """Share of every online-phase batch drawn from the online transitions; the rest is offline data."""
    online_buffer_size: int | None = None
    """Capacity of the online buffer (oldest overwritten first). Default: online_steps (keep all)."""
    batch_size: int = 256
    """Transitions per update."""
    seed: int = 0
    """Seed of the networks, the batch draws, the environments and the evaluation episodes."""
    eval_every: int = 1_000
    """Evaluate every this many updates (counted over both phases), at the phase boundary and at the end."""
    eval_episodes: int = 10
    """Episodes per evaluation, stepped in parallel."""
    temperature: float | None = None
    """β, the AWR inverse temperature. Default: the preset's (or the checkpoint's)."""
    expectile: float | None = None
    """τ, the value expectile. Default: the preset's (or the checkpoint's)."""
    preset: Literal["mujoco", "antmaze", "kitchen", "adroit"] = "mujoco"
    """The paper's per-domain τ, β, actor dropout and reward transform."""
    device: Literal["cpu", "cuda", "auto"] = "auto"
    """Training device; auto picks cuda when available. Environments run on the CPU."""
    compile: bool = False
    """torch.compile the whole update step."""
    cudagraphs: bool = False
    """Capture the compiled step in a CUDA graph (needs CUDA)."""
    order: Literal["paper", "summed"] = "paper"
    """Update order: step V first, then the actor and Q with the new V (paper); or one summed backward."""
    logger: Literal["csv", "wandb", "tensorboard", "none"] = "csv"
    """TorchRL logger; wandb runs offline when no API key is set."""
    output_dir: Path | None = None
    """Run folder (checkpoint, logs, summary.json, curve PNG). Default: runs/<dataset>-finetune-seed<seed>-<time>."""
    resume: bool = False
    """Continue the run in --output-dir from its checkpoint (either phase)."""
    checkpoint_every: int = 5_000
    """Write the checkpoint every this many updates (online: at the end of the collection that crosses it), and at the end."""
    log_every: int = 500
    """Read metrics to the host and log them every this many updates."""
    hidden_sizes: tuple[int, ...] = (256, 256)
    """Hidden layer widths of every network. Ignored with --checkpoint."""
    lr: float = 3e-4
    """Adam learning rate of every network, constant in both phases."""
    tau: float = 0.005
    """Soft target update rate of the critics."""
    gamma: float = 0.99
    """Discount. Ignored with --checkpoint."""
    normalize_observations: bool = False
    """Standardise observations (offline and online) with the dataset's statistics. Ignored with --checkpoint."""
    progress: bool = True
    """Show the progress bars."""

    def network_config(self) -> Config:
        """The offline trainer's :class:`~iql_torchrl.trainer.Config` for these networks and data, resolved."""
        shared = {f.name: getattr(self, f.name) for f in fields(Config) if f.name in {g.name for g in fields(self)}}
        shared.update(steps=self.offline_steps, resume=False, output_dir=None, hidden_sizes=tuple(self.hidden_sizes))
        return Config(**shared).resolved()

    @property
    def updates_per_collection(self) -> int:
        return round(self.utd_ratio * self.frames_per_batch)


# ---------------------------------------------------------------------------------------- finetune
def finetune(config: FinetuneConfig) -> dict:
    """Runs the configured offline phase (or loads it) and the online phase; returns the summary.

    With ``resume=True`` the run in ``output_dir`` continues with the configuration saved in its
    checkpoint and ends where an uninterrupted run would.
    """
    state, offline_state = None, None
    if config.resume:
        state = _checkpoint_to_resume(config)
        config = FinetuneConfig(**{**state["finetune_config"], "resume": True, "progress": config.progress})
    elif config.checkpoint is not None:
        offline_state = load_checkpoint(Path(config.checkpoint) / CHECKPOINT_NAME, map_location="cpu")
        config = _adopt_offline_run(config, offline_state)
    config.hidden_sizes = tuple(config.hidden_sizes)
    net_config = config.network_config()
    _check(config, net_config)
    output_dir = _prepare_output_dir(config)
    torch.manual_seed(config.seed)

    # data: the offline buffer, with the preset's transforms
    if config.dataset in BUILDERS:
        ensure_dataset(config.dataset, progress=config.progress)
    buffer = load_minari_dataset(
        config.dataset,
        batch_size=config.batch_size,
        device=net_config.device,
        reward_transform=PRESETS[config.preset].reward_transform,
        normalize_observations=config.normalize_observations,
    )
    metadata = buffer.metadata
    saved = state or offline_state
    if saved is not None and saved["metadata"] != metadata.state_dict():
        raise ValueError(f"{config.dataset} no longer matches the checkpoint's data (statistics or transforms differ).")
    data = buffer_transitions(buffer)

    # networks, loss and the one update step of both phases
    loss = build_loss(net_config, metadata)
    mode = "cudagraphs" if config.cudagraphs else "compile" if config.compile else "eager"
    update = IQLUpdate(loss, total_steps=None, lr=config.lr, tau=config.tau, order=config.order, mode=mode, data=data)
    generator = torch.Generator(device=net_config.device).manual_seed(config.seed)
    run = _Run(config, net_config, output_dir, loss, update, generator, metadata)
    if state is not None:
        run.load(state)
    elif offline_state is not None:
        loss.load_state_dict(offline_state["loss"])
        update.load_state_dict(offline_state["update"])
        update.actor_lr.fill_(config.lr)  # constant learning rates: undo the offline cosine decay
        run.step = offline_state["step"]
        run.curve = [dict(p, phase="offline", env_steps=0) for p in offline_state["curve"] if p["step"] < run.step]

    wall_start = time.perf_counter()
    if run.phase == "offline":
        run.offline_phase(data)
    run.online_phase(data)
    summary = run.summary(time.perf_counter() - wall_start)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_curve(run.curve, output_dir / "learning_curve.png",
               f"IQL fine-tuning on {config.dataset} (seed {config.seed})", phase_boundary=config.offline_steps)
    if run.logger is not None and config.logger == "wandb":
        run.logger.experiment.finish()
    return summary


class _Run:
    """The state of one fine-tuning run and its two loops (kept together so a checkpoint is one dict)."""

    def __init__(self, config, net_config, output_dir, loss, update, generator, metadata):
        self.config, self.net_config, self.output_dir = config, net_config, output_dir
        self.loss, self.update, self.generator, self.metadata = loss, update, generator, metadata
        self.logger = _make_logger(config, output_dir)
        self.phase = "offline"
        self.step = 0  # updates, both phases
        self.env_steps = 0
        self.curve: list[dict] = []
        self.offline_result: dict | None = None
        self.last_result: dict | None = None
        self.train_seconds = 0.0
        self.timed_updates = 0
        self.episode_returns: list[float] = []  # online training episodes (raw env return)
        self.running_returns = torch.zeros(config.num_envs, dtype=torch.float64)
        self.online_state: dict | None = None  # collector, episodes, buffer: restored in online_phase
        self.last_values = {"loss_qvalue": float("nan")}

    # -- offline ----------------------------------------------------------------------------
    def offline_phase(self, data) -> None:
        config = self.config
        bar = tqdm(total=config.offline_steps, initial=self.step, desc="IQL offline", unit="upd",
                   disable=not config.progress, mininterval=1.0, dynamic_ncols=True)
        timed_from = time.perf_counter()
        for step in range(self.step + 1, config.offline_steps + 1):
            metrics = self.update(sample_indices(data.batch_size[0], config.batch_size, self.generator, self.net_config.device))
            self.step, self.timed_updates = step, self.timed_updates + 1
            bar.update(1)
            if step % config.log_every == 0 or step % config.eval_every == 0 or step % config.checkpoint_every == 0:
                self.train_seconds += time.perf_counter() - timed_from
                self._log_metrics(metrics)
                if step % config.eval_every == 0 and step < config.offline_steps:
                    self._evaluate()
                if step % config.checkpoint_every == 0 and step < config.offline_steps:
                    self._checkpoint()
                self._postfix(bar)
                timed_from = time.perf_counter()
        self.train_seconds += time.perf_counter() - timed_from
        bar.close()
        self.offline_result = self._evaluate()  # the score before any online step
        self.phase = "online"
        self._checkpoint()

    # -- online -----------------------------------------------------------------------------
    def online_phase(self, data) -> None:
        config = self.config
        env = make_online_env(self.metadata, config.num_envs, seed=config.seed)
        actor = self.loss.get_stateful_net("actor_network", copy=True).eval()  # shares the trained tensors
        collector = Collector(
            env,
            make_exploration_policy(actor, self.metadata),
            frames_per_batch=config.frames_per_batch,
            total_frames=config.online_steps,
            policy_device=self.net_config.device,
            env_device="cpu",
            storing_device=self.net_config.device,
            auto_register_policy_transforms=False,  # the policy needs no env transform of its own
        )
        replay = make_offline_online_buffer(
            data,
            online_capacity=config.online_buffer_size or config.online_steps,
            online_fraction=config.online_fraction,
            batch_size=config.batch_size,
            device=self.net_config.device,
        )
        self.collector, self.env, self.replay = collector, env, replay
        if self.online_state is not None:
            collector.load_state_dict(self.online_state["collector"])
            if self.online_state["episodes"] is not None:
                restore_episodes(env, self.online_state["episodes"])
                collector._carrier.update(self.online_state["carrier"])  # the running episodes' current step
            replay.online_buffer.load_state_dict(self.online_state["buffer"])
            restore_rng(self.online_state["rng"], [self.generator])  # again, last: building the collector drew
        bar = tqdm(total=config.online_steps, initial=self.env_steps, desc="IQL online", unit="env step",
                   disable=not config.progress, mininterval=1.0, dynamic_ncols=True)
        try:
            for rollout in collector:
                transitions = rollout.reshape(-1).select(*TRANSITION_KEYS)
                replay.extend(transitions)
                self.env_steps += transitions.batch_size[0]
                self._count_episodes(rollout)
                bar.update(transitions.batch_size[0])

                timed_from, before = time.perf_counter(), self.step
                for _ in range(config.updates_per_collection):
                    metrics = self.update(replay.sample())
                self.step += config.updates_per_collection
                self.timed_updates += config.updates_per_collection
                self.train_seconds += time.perf_counter() - timed_from

                done = self.env_steps >= config.online_steps
                crossed = lambda every: self.step // every > before // every  # noqa: E731
                if crossed(config.log_every) or crossed(config.eval_every) or crossed(config.checkpoint_every) or done:
                    self._log_metrics(metrics, {"env_steps": self.env_steps, **self._episode_stats()})
                    if crossed(config.eval_every) or done:
                        self._evaluate()
                    if crossed(config.checkpoint_every) or done:
                        self._checkpoint()
                    self._postfix(bar)
        finally:
            bar.close()
            collector.shutdown()
        if self.last_result is None:  # resumed a finished run
            self._evaluate(record=False)

    def _count_episodes(self, rollout) -> None:
        reward = self.metadata.untransform_reward(rollout.get(("next", "reward")).squeeze(-1).to(torch.float64).cpu())
        done = rollout.get(("next", "done")).squeeze(-1).cpu()
        for t in range(reward.shape[1]):
            self.running_returns += reward[:, t]
            for i in done[:, t].nonzero().flatten().tolist():
                self.episode_returns.append(float(self.running_returns[i]))
                self.running_returns[i] = 0.0

    def _episode_stats(self) -> dict:
        recent = self.episode_returns[-10:]
        if not recent:
            return {}
        mean = sum(recent) / len(recent)
        stats = {"train_episode_return": mean}
        if self.metadata.ref_min_score is not None and self.metadata.ref_max_score is not None:
            stats["train_normalized_score"] = float(self.metadata.normalized_score(mean))
        return stats

    # -- shared -----------------------------------------------------------------------------
    def _log_metrics(self, metrics, extra: dict | None = None) -> None:
        values = metrics_to_floats(metrics)  # the one host sync of the interval
        _raise_if_nonfinite(self.update)
        self.last_values = values
        _log(self.logger, {**values, **(extra or {})}, self.step)

    def _postfix(self, bar) -> None:
        rate = self.timed_updates / self.train_seconds if self.train_seconds > 0 else float("nan")
        postfix = {"upd/s": f"{rate:.0f}", "loss_q": f"{self.last_values['loss_qvalue']:.3g}"}
        if self.curve:
            postfix["score"] = f"{self.curve[-1]['normalized_score']:.1f}"
        bar.set_postfix(postfix)

    def _evaluate(self, record: bool = True) -> dict:
        actor = self.loss.get_stateful_net("actor_network", copy=True).eval()
        result = evaluate_policy(actor, self.metadata, episodes=self.config.eval_episodes,
                                 seed=self.config.seed + 10_000, device=self.net_config.device)
        point = {"step": self.step, "env_steps": self.env_steps, "phase": self.phase,
                 "normalized_score": result.get("normalized_score", float("nan")), "return_mean": result["return_mean"]}
        if record:
            self.curve.append(point)
            _log(self.logger, {k: result[k] for k in ("return_mean", "normalized_score") if k in result}, self.step)
        self.last_result = result
        return result

    def _checkpoint(self) -> None:
        _raise_if_nonfinite(self.update)  # never write non-finite parameters
        if not all(torch.isfinite(p).all() for p in self.loss.parameters()):
            raise NonFiniteLossError(
                f"Training stopped: parameters became non-finite before update {self.step}. "
                "The last checkpoint (written before it) is intact; try a lower --lr."
            )
        online = None
        if self.phase == "online" and hasattr(self, "collector"):
            running = not self.env.is_closed  # the collector closes the env after its last frame
            online = {
                "collector": self.collector.state_dict(),
                "episodes": episode_states(self.env) if running else None,
                "carrier": self.collector._carrier.clone() if running else None,
                "buffer": self.replay.online_buffer.state_dict(),
            }
        save_checkpoint(self.output_dir / CHECKPOINT_NAME, {
            "loss": self.loss.state_dict(),
            "update": self.update.state_dict(),
            "rng": capture_rng([self.generator]),
            "phase": self.phase,
            "step": self.step,
            "env_steps": self.env_steps,
            "curve": self.curve,
            "offline_result": self.offline_result,
            "train_seconds": self.train_seconds,
            "timed_updates": self.timed_updates,
            "episode_returns": self.episode_returns,
            "running_returns": self.running_returns.clone(),
            "online": online,
            "metadata": self.metadata.state_dict(),
            # the offline trainer's Config of these networks: load_actor and `python -m iql_torchrl.evaluate` read it
            "config": _jsonable(asdict(self.net_config)),
            "finetune_config": _jsonable(asdict(self.config)),
            "version": iql_torchrl.__version__,
        })

    def load(self, state: dict) -> None:
        self.loss.load_state_dict(state["loss"])
        self.update.load_state_dict(state["update"])
        restore_rng(state["rng"], [self.generator])
        self.phase, self.step, self.env_steps = state["phase"], state["step"], state["env_steps"]
        self.curve, self.offline_result = state["curve"], state["offline_result"]
        self.train_seconds, self.timed_updates = state["train_seconds"], state["timed_updates"]
        self.episode_returns, self.running_returns = state["episode_returns"], state["running_returns"]
        if state["online"] is not None:
            self.online_state = {**state["online"], "rng": state["rng"]}

    def summary(self, wall_seconds: float) -> dict:
        config, last = self.config, self.last_result
        return {
            "dataset": config.dataset,
            "seed": config.seed,
            "started_from": str(config.checkpoint) if config.checkpoint is not None else None,
            "offline_steps": config.offline_steps,
            "online_steps": config.online_steps,
            "env_steps": self.env_steps,
            "updates": self.step,
            "utd_ratio": config.utd_ratio,
            "online_fraction": config.online_fraction,
            "num_envs": config.num_envs,
            "frames_per_batch": config.frames_per_batch,
            "batch_size": config.batch_size,
            "temperature": self.net_config.temperature,
            "expectile": self.net_config.expectile,
            "preset": config.preset,
            "offline_normalized_score": self.offline_result.get("normalized_score"),
            "offline_return_mean": self.offline_result["return_mean"],
            "normalized_score": last.get("normalized_score"),
            "return_mean": last["return_mean"],
            "return_std": last["return_std"],
            "eval_episodes": config.eval_episodes,
            "train_episodes": len(self.episode_returns),
            "updates_per_second": self.timed_updates / self.train_seconds if self.train_seconds > 0 else None,
            "wall_seconds": wall_seconds,
            "curve": self.curve,
            "version": iql_torchrl.__version__,
        }


# ---------------------------------------------------------------------------------------- helpers
def _adopt_offline_run(config: FinetuneConfig, offline_state: dict) -> FinetuneConfig:
    """The fine-tuning config with the offline run's data, networks and step count."""
    if "finetune_config" in offline_state:
        raise ValueError(f"{config.checkpoint} is a fine-tuning run; --checkpoint takes an offline run (iql_offline.py).")
    offline = offline_state["config"]
    if offline.get("num_seeds", 1) > 1:
        raise ValueError(f"{config.checkpoint} trained {offline['num_seeds']} seeds at once; fine-tuning takes a one-seed run.")
    adopted = {name: offline[name] for name in
               ("dataset", "preset", "temperature", "expectile", "hidden_sizes", "gamma", "normalize_observations")}
    return FinetuneConfig(**{**asdict(config), **adopted, "offline_steps": offline_state["step"]})


def _check(config: FinetuneConfig, net_config: Config) -> None:
    if config.cudagraphs and net_config.device != "cuda":
        raise ValueError("--cudagraphs needs CUDA (--device cuda on a machine with a GPU).")
    if net_config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here; use --device cpu (or auto).")
    if config.offline_steps < 0 or config.online_steps <= 0 or config.batch_size <= 0:
        raise ValueError("--offline-steps must be >= 0, --online-steps and --batch-size positive.")
    if config.frames_per_batch % config.num_envs:
        raise ValueError(f"--frames-per-batch ({config.frames_per_batch}) must be a multiple of --num-envs ({config.num_envs}).")
    if config.online_steps % config.frames_per_batch:
        raise ValueError(f"--online-steps ({config.online_steps}) must be a multiple of --frames-per-batch ({config.frames_per_batch}).")
    if config.updates_per_collection < 1:
        raise ValueError(f"--utd-ratio {config.utd_ratio} gives no update per collection of {config.frames_per_batch} env steps.")
    if not 0.0 < config.online_fraction < 1.0:
        raise ValueError(f"--online-fraction must be in (0, 1), got {config.online_fraction}.")


def _checkpoint_to_resume(config: FinetuneConfig) -> dict:
    if config.output_dir is None:
        raise ValueError("--resume needs --output-dir: the run folder to continue.")
    path = Path(config.output_dir) / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no {CHECKPOINT_NAME} in {config.output_dir}.")
    state = load_checkpoint(path, map_location="cpu")
    if "finetune_config" not in state:
        raise ValueError(f"{config.output_dir} is an offline run: continue it with iql_offline.py --resume, "
                         "or fine-tune it with --checkpoint.")
    state["finetune_config"]["output_dir"] = str(config.output_dir)
    return state


def _prepare_output_dir(config: FinetuneConfig) -> Path:
    if config.resume:
        return Path(config.output_dir)
    if config.output_dir is not None:
        output_dir = Path(config.output_dir)
    else:
        name = config.dataset.replace("/", "_")
        output_dir = Path("runs") / f"{name}-finetune-seed{config.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(
            f"{output_dir} already exists: pass --resume to continue that run, or choose another --output-dir."
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    return output_dir
