"""Offline-to-online fine-tuning: an offline IQL policy keeps learning from its own interaction.

:class:`FinetuneConfig` is the run configuration (``examples/iql_finetune.py`` turns it into the
command line with tyro); :func:`finetune` runs it on the run harness (:class:`~iql_torchrl.runs.run.Run`)
and returns the summary it writes to ``output_dir/summary.json``. Two phases, one update step
(the same :class:`~iql_torchrl.IQLUpdate` object throughout):

1. offline -- ``offline_steps`` updates on the dataset with the offline job's own loop
   (:meth:`~iql_torchrl.runs.run.Run.updates`), or, with ``checkpoint=DIR``, the offline run
   saved in DIR: its networks, optimizer moments and step count;
2. online -- TorchRL's ``Collector`` (0.14's name for ``SyncDataCollector``) steps ``num_envs``
   copies of the dataset's environment with the stochastic policy, ``frames_per_batch`` env steps
   at a time; they go into the online half of an ``OfflineToOnlineReplayBuffer`` whose other half
   is the offline data, and after each collection the step runs ``utd_ratio`` updates per env
   step on batches with ``online_fraction`` online transitions.

On goal data whose successes are terminal (the maze and antmaze presets' rule), the online
environments end an episode at its success, as D4RL AntMaze's do, so online transitions follow the
offline data's rule; evaluation keeps the environment's own.

Learning rates stay constant in both phases, as in the official fine-tuning configuration
(``antmaze_finetune_config.py``: ``opt_decay_schedule = None``): a fine-tuned actor must keep
learning. A run started from an offline checkpoint therefore sets every learning rate to its own
(the offline job's cosine has decayed the actor's to ~0) and keeps the optimizers' moments; the
settings it adopts from the offline run are :data:`ADOPTED_FROM_OFFLINE_RUN`.

A resumed run continues exactly -- including the collector's counters, the online buffer, every
random state and the episodes that were running (rebuilt by replaying their reset and actions:
:class:`~iql_torchrl.jobs.online.EpisodeReplay`).
"""
from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torchrl.collectors import Collector

from iql_torchrl.runs.checkpoint import load_run_checkpoint, restore_rng
from iql_torchrl.runs.config import PRESET_FIELDS, PRESETS, ConfigError, RunConfig, config_to_dict, conflicting_flags, given_fields
from iql_torchrl.data import TRANSITION_KEYS, buffer_transitions
from iql_torchrl.datasets import discrete_actions
from iql_torchrl.runs.evaluation import reference_scores_problem
from iql_torchrl.jobs.online import (
    episode_states,
    make_exploration_policy,
    make_offline_online_buffer,
    make_online_env,
    restore_episodes,
)
from iql_torchrl.runs.builders import build_loss, index_sampler, make_update
from iql_torchrl.runs.settings import check_device
from iql_torchrl.runs.run import SUMMARY_NAME, Run
from iql_torchrl.step.update import OPTIMIZER_GROUPS

__all__ = ["FinetuneConfig", "finetune", "FINETUNE_DATASET"]

FINETUNE_DATASET = "iql_torchrl/pendulum/medium-v0"  # offline IQL stays clearly below expert on it
# what an offline run fixes (--checkpoint): the data as its networks read it, the networks' shapes, the
# discount its values were learned with and the optimizer its moments belong to; a flag given with another value is refused
ADOPTED_FROM_OFFLINE_RUN = ("dataset", "preset", "reward_transform", "normalize_observations", "clip_actions", "goal_input",
                            "success_terminal", "hidden_sizes", "actor", "gamma", "optimizer", "weight_decay")
# the loss's β and τ: the offline run's unless given (the update step takes new values as they are)
DEFAULTS_FROM_OFFLINE_RUN = ("temperature", "expectile")


@dataclass
class FinetuneConfig(RunConfig):
    """Offline IQL on a Minari dataset, then online fine-tuning in its environment."""

    dataset: str = FINETUNE_DATASET
    eval_every: int = 1_000
    offline_steps: int = 2_000
    """Offline gradient steps before any interaction (>= 0). With --checkpoint: the offline run's own."""
    online_steps: int = 4_000
    """Environment steps of the online phase, summed over the environments."""
    checkpoint: Path | None = None
    """Start from this offline run folder (iql_offline.py's --output-dir) at its latest checkpoint: its networks, optimizer state and update count, and its --dataset, --preset, --reward-transform, --normalize-observations, --clip-actions, --goal-input, --success-terminal, --hidden-sizes, --actor, --gamma, --optimizer, --weight-decay and --offline-steps (one of these given with another value is refused); its --temperature and --expectile unless given. The learning rates are this run's."""
    num_envs: int = 4
    """Environments stepped by the collector (a TorchRL SerialEnv). They run on the CPU."""
    frames_per_batch: int = 200
    """Env steps (over all environments) per collection; the updates follow each collection."""
    utd_ratio: float = 1.0
    """Updates per environment step (the paper: 1)."""
    online_fraction: float = 0.5
    """Share of every online-phase batch drawn from the online transitions, in (0, 1); the rest is offline data."""
    online_buffer_size: int | None = None
    """Capacity of the online buffer (oldest overwritten first). Default: online_steps (keep all)."""

    @property
    def updates_per_collection(self) -> int:
        return round(self.utd_ratio * self.frames_per_batch)

    def total_updates(self) -> int:
        offline = 0 if self.checkpoint is not None else self.offline_steps
        return offline + self.online_steps // self.frames_per_batch * self.updates_per_collection

    def check(self) -> None:
        super().check()
        self.check_integers(0, "offline_steps")
        self.check_integers(1, "online_steps", "num_envs", "frames_per_batch")
        if self.frames_per_batch % self.num_envs:
            raise ConfigError(f"--frames-per-batch ({self.frames_per_batch}) must be a multiple of --num-envs ({self.num_envs}).")
        if self.online_steps % self.frames_per_batch:
            raise ConfigError(f"--online-steps ({self.online_steps}) must be a multiple of --frames-per-batch ({self.frames_per_batch}).")
        if not (self.utd_ratio > 0 and self.updates_per_collection >= 1):
            raise ConfigError(f"--utd-ratio {self.utd_ratio} gives no update per collection of {self.frames_per_batch} env steps.")
        if not 0.0 < self.online_fraction < 1.0:
            raise ConfigError(f"--online-fraction {self.online_fraction}: must be in (0, 1).")
        if self.online_buffer_size is not None and self.online_buffer_size < 1:
            raise ConfigError(f"--online-buffer-size {self.online_buffer_size}: must be >= 1.")
        if self.actor == "deterministic":
            raise ConfigError(DETERMINISTIC_REFUSAL.format(
                source="--actor deterministic", remedy="fine-tune a Gaussian actor (leave out --actor)"))
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("Fine-tuning runs in one process: start it without torchrun "
                              "(data-parallel training is examples/iql_offline.py's).")

    def actor_choice(self) -> str:
        """``--actor`` as given, else the Gaussian actor on every preset: fine-tuning explores by sampling it."""
        return "gaussian" if self.actor == "auto" else self.actor


# ---------------------------------------------------------------------------------------- finetune
DETERMINISTIC_REFUSAL = ("{source}: fine-tuning explores by sampling the policy, and a deterministic actor has nothing to "
                         "sample; {remedy}.")
DISCRETE_REFUSAL = ("--dataset {dataset} has discrete actions: fine-tuning on discrete actions is not supported yet; "
                    "train offline with examples/iql_offline.py.")


def finetune(config: FinetuneConfig, given: set[str] | None = None) -> dict:
    """Runs the configured offline phase (or loads it) and the online phase; returns the summary.

    With ``resume=True`` the run in ``output_dir`` continues with the configuration saved in its
    checkpoint and ends where an uninterrupted run would (the resume rules are
    :mod:`iql_torchrl.runs.resume`'s).
    """
    offline_run = preset_reason = sources = None
    if not config.resume and config.checkpoint is not None:
        check_device(config.device)  # before the offline run is read
        offline_run = load_run_checkpoint(config.checkpoint, map_location="cpu")
        given = given_fields(config) | set(given or ())
        config = adopt_offline_run(config, offline_run, given)
        if config.actor == "deterministic":
            raise ConfigError(DETERMINISTIC_REFUSAL.format(
                source=f"--checkpoint {config.checkpoint} trained a deterministic actor",
                remedy="fine-tune an offline run trained with --actor gaussian (the hopper and walker2d presets' actor is deterministic)"))
        sources = {name: "the offline run's" for name in PRESET_FIELDS if name not in given}
        reason = offline_run.get("normalization_reason")
        sources["normalize_observations"] = "the offline run's" + (f": {reason}" if reason else "")
        preset_reason = (f"the offline run {config.checkpoint} trained with it"
                         + (f" ({offline_run['preset_reason']})" if offline_run.get("preset_reason") else ""))
        if not (Path(config.checkpoint) / SUMMARY_NAME).is_file():  # stopped early, or still training
            print(f"iql_torchrl: the offline run {config.checkpoint} stopped at update {offline_run['step']} of "
                  f"{offline_run['config']['steps']} (no {SUMMARY_NAME}): fine-tuning starts from that checkpoint.",
                  file=sys.stderr)
    if config.actor == "auto":  # where the preset's actor is deterministic, the line says why this one is Gaussian
        sources = {**(sources or {}), "actor": "fine-tuning samples its policy"}
    if not config.resume and discrete_actions(config.dataset):
        raise ConfigError(DISCRETE_REFUSAL.format(dataset=config.dataset))
    with Run.begin(config, job="finetune", given=given, label="finetune", preset_reason=preset_reason,
                   sources=sources) as run:
        if run.finished:
            return run.finished_summary()
        config = run.config
        torch.manual_seed(config.seed)
        data = buffer_transitions(run.load_data(source=offline_run))
        if run.metadata.discrete:  # data that could not be read before it was downloaded
            raise ConfigError(DISCRETE_REFUSAL.format(dataset=config.dataset))
        loss = build_loss(config, run.metadata)
        update = make_update(config, loss, data, total_steps=None)
        generator = torch.Generator(device=run.device).manual_seed(config.seed)
        online = OnlinePhase(run, loss, update, generator, data)
        run.attach(loss, update, [generator], [config.seed], extra_state=online.state_dict, point_fields=online.point_fields)
        if run.state is not None:
            online.load_state_dict(run.state)
        elif offline_run is not None:
            loss.load_state_dict(offline_run["loss"])
            update.load_state_dict(offline_run["update"])
            for group in OPTIMIZER_GROUPS:  # this run's constant rates, not the offline run's (its actor's decayed)
                update.set_learning_rate(group, getattr(config, f"{group}_lr") or config.lr)
            run.step = offline_run["step"]
            run.curve = [dict(p, phase="offline", env_steps=0) for p in offline_run["curve"] if p["step"] < run.step]
        run.evaluate_if_pending()

        if online.phase == "offline":
            draw = index_sampler([generator], data.batch_size[0], config.batch_size, run.device)
            for _ in run.updates(config.offline_steps, update, desc="IQL offline"):
                run.after_update(update(draw()))
            if not run.curve or run.curve[-1]["step"] != run.step:  # no offline update ran in this session
                run.checkpoint_and_evaluate()
            online.offline_result = run.last_eval  # the score before any online step
            online.phase = "online"
            run.checkpoint()
        online.collect_and_train()

        summary = {**online.summary_fields(), **run.summary_fields()}
        return run.finish(summary, f"IQL fine-tuning on {config.dataset} (seed {config.seed})",
                          phase_boundary=config.offline_steps)


def adopt_offline_run(config: FinetuneConfig, offline_run: dict, given: set[str]) -> FinetuneConfig:
    """The fine-tuning config with what the offline run fixes (:data:`ADOPTED_FROM_OFFLINE_RUN` and its update
    count) and its β and τ where ``given`` (the fields set on purpose) lacks them; a given field that differs
    from what the run fixes is refused (:class:`ConfigError`, listing each with both values)."""
    if offline_run.get("job") != "offline":
        raise ConfigError(f"--checkpoint {config.checkpoint} is not an offline run (iql_offline.py's run folder).")
    offline = offline_run["config"]
    if offline.get("num_seeds", 1) > 1:
        raise ConfigError(f"--checkpoint {config.checkpoint} trained {offline['num_seeds']} seeds at once; "
                          "fine-tuning takes a one-seed run.")
    if offline.get("sweep") is not None:
        raise ConfigError(f"--checkpoint {config.checkpoint} trained a --sweep of settings at once; "
                          "fine-tuning takes a run of one setting and one seed.")
    fixed = {name: offline[name] for name in ADOPTED_FROM_OFFLINE_RUN if name in offline}  # older runs: no goal_input
    if fixed["actor"] == "auto":  # older runs: the actor their preset gave
        fixed["actor"] = PRESETS[offline["preset"]].actor
    fixed["offline_steps"] = offline_run["step"]
    conflicts = conflicting_flags(given, config_to_dict(config), fixed, "the offline run's",
                                  agrees=lambda name, value: value == "auto")
    if conflicts:
        raise ConfigError(
            f"--checkpoint {config.checkpoint} fine-tunes the offline run with the settings it trained with; "
            "these flags differ from them:\n" + "\n".join(conflicts)
            + "\nDrop them to fine-tune that run, or train a new offline run with them (examples/iql_offline.py)."
        )
    fixed["hidden_sizes"] = tuple(fixed["hidden_sizes"])
    defaults = {name: offline[name] for name in DEFAULTS_FROM_OFFLINE_RUN if name not in given}
    return FinetuneConfig(**{**asdict(config), **fixed, **defaults})


class OnlinePhase:
    """The online loop and its state (env steps, training episodes, collector, online buffer)."""

    def __init__(self, run: Run, loss, update, generator: torch.Generator, data):
        self.run, self.loss, self.update, self.generator, self.data = run, loss, update, generator, data
        self.config = run.config
        self.phase = "offline"
        self.env_steps = 0
        self.offline_result: dict | None = None
        self.episode_returns: list[float] = []  # online training episodes (raw env return)
        self.running_returns = torch.zeros(self.config.num_envs, dtype=torch.float64)
        self.saved_online: dict | None = None  # collector, episodes, buffer: restored in collect_and_train()
        self.collector = self.env = self.replay = None

    def point_fields(self) -> dict:
        return {"env_steps": self.env_steps, "phase": self.phase}

    def collect_and_train(self) -> None:
        run, config, device = self.run, self.config, self.run.device
        env = make_online_env(run.metadata, config.num_envs, seed=config.seed)
        actor = self.loss.get_stateful_net("actor_network", copy=True).eval()  # shares the trained tensors
        collector = Collector(
            env, make_exploration_policy(actor, run.metadata), frames_per_batch=config.frames_per_batch,
            total_frames=config.online_steps, policy_device=device, env_device="cpu", storing_device=device,
            auto_register_policy_transforms=False,  # the policy needs no env transform of its own
        )
        replay = make_offline_online_buffer(
            self.data, online_capacity=config.online_buffer_size or config.online_steps,
            online_fraction=config.online_fraction, batch_size=config.batch_size, device=device,
        )
        self.collector, self.env, self.replay = collector, env, replay
        if self.saved_online is not None:
            collector.load_state_dict(self.saved_online["collector"])
            if self.saved_online["episodes"] is not None:
                restore_episodes(env, _episodes_as_arrays(self.saved_online["episodes"]))
                collector._carrier.update(self.saved_online["carrier"])  # the running episodes' current step
            replay.online_buffer.load_state_dict(self.saved_online["buffer"])
            restore_rng(run.state["rng"][0], [self.generator])  # again, last: building the collector drew
        # sampled batches are a new call signature: the first online update compiles (timed apart)
        run.progress = run.loop_progress(self.update, total=config.online_steps, initial=self.env_steps, desc="IQL online",
                                         unit="env step")
        try:
            for rollout in collector:
                transitions = rollout.reshape(-1).select(*TRANSITION_KEYS)
                replay.extend(transitions)
                self.env_steps += transitions.batch_size[0]
                self._count_episodes(rollout)
                run.progress.advance(transitions.batch_size[0])

                before = run.step
                metrics = run.run_updates(self.update, replay.sample, config.updates_per_collection)
                run.step += config.updates_per_collection
                run.timing.pause()  # the next collection is not update time
                run.after_updates(metrics, before, self.env_steps >= config.online_steps,
                                  extra=lambda: {"env_steps": self.env_steps, **self._episode_stats()})
        finally:
            run.progress.close()
            collector.shutdown()

    def summary_fields(self) -> dict:
        """The fine-tuning entries of the summary: the run's phases, sizes and the score before going online."""
        config = self.config
        return {
            "dataset": config.dataset,
            "seed": config.seed,
            "started_from": str(config.checkpoint) if config.checkpoint is not None else None,
            "offline_steps": config.offline_steps,
            "online_steps": config.online_steps,
            "env_steps": self.env_steps,
            "updates": self.run.step,
            "utd_ratio": config.utd_ratio,
            "online_fraction": config.online_fraction,
            "num_envs": config.num_envs,
            "frames_per_batch": config.frames_per_batch,
            "batch_size": config.batch_size,
            "temperature": config.temperature,
            "expectile": config.expectile,
            "preset": config.preset,
            "offline_normalized_score": self.offline_result.get("normalized_score"),
            "offline_return_mean": self.offline_result["return_mean"],
            "train_episodes": len(self.episode_returns),
        }

    def _count_episodes(self, rollout) -> None:
        reward = self.run.metadata.untransform_reward(rollout.get(("next", "reward")).squeeze(-1).to(torch.float64).cpu())
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
        if reference_scores_problem(self.run.metadata) is None:
            stats["train_normalized_score"] = float(self.run.metadata.normalized_score(mean))
        return stats

    def state_dict(self) -> dict:
        online = None
        if self.phase == "online" and self.collector is not None:
            running = not self.env.is_closed  # the collector closes the env after its last frame
            online = {
                "collector": self.collector.state_dict(),
                "episodes": _episodes_as_tensors(episode_states(self.env)) if running else None,
                "carrier": self.collector._carrier.to_dict() if running else None,  # plain tensors: loads with weights_only
                "buffer": self.replay.online_buffer.state_dict(),
            }
        return {
            "phase": self.phase,
            "env_steps": self.env_steps,
            "offline_result": self.offline_result,
            "episode_returns": self.episode_returns,
            "running_returns": self.running_returns.clone(),
            "online": online,
        }

    def load_state_dict(self, state: dict) -> None:
        self.phase, self.env_steps, self.offline_result = state["phase"], state["env_steps"], state["offline_result"]
        self.episode_returns, self.running_returns = state["episode_returns"], state["running_returns"]
        self.saved_online = state["online"]


# a checkpoint holds tensors and plain data only (it loads with weights_only=True)
def _episodes_as_tensors(episodes: list[dict]) -> list[dict]:
    return [{**e, "actions": [torch.from_numpy(a) for a in e["actions"]]} for e in episodes]


def _episodes_as_arrays(episodes: list[dict]) -> list[dict]:
    return [{**e, "actions": [a.numpy() for a in e["actions"]]} for e in episodes]
