"""Behaviour policies for the locomotion datasets: TorchRL's SAC on a MuJoCo task, with snapshots.

D4RL made its locomotion sets from Soft Actor-Critic agents: ``medium`` from an agent stopped at
about a third of the expert's return, ``medium-replay`` from that agent's replay buffer, ``expert``
from the fully trained one. :func:`train_behaviour` trains such an agent with TorchRL's own parts
(``SACLoss``, ``SoftUpdate``, a ``Collector`` and a ``ReplayBuffer``) and writes, every
``snapshot_every`` frames, the actor's weights and its return (:class:`Snapshot`) into a folder;
:mod:`iql_torchrl.datasets.locomotion` builds the datasets from the snapshots kept in the package.

A stop asked between two batches writes a checkpoint first. A training folder holds ``checkpoint.pt`` (networks, optimizers, the entropy coefficient, the
frame count, the random state; weights only) and ``buffer/`` (the replay buffer). A run resumes
from both; from a checkpoint alone (a fresh checkout, where only the checkpoint is kept) it first
refills the buffer with ``warmup_frames`` frames of the current policy, then trains on.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from tensordict.nn import TensorDictModule
from torch import nn

__all__ = ["ENVIRONMENTS", "SACSettings", "Snapshot", "load_snapshot", "make_sac_actor", "snapshot_policy", "train_behaviour"]

# short name: gymnasium id
ENVIRONMENTS = {"hopper": "Hopper-v5", "walker2d": "Walker2d-v5", "halfcheetah": "HalfCheetah-v5"}
HIDDEN = (256, 256)


@dataclass(frozen=True)
class SACSettings:
    """SAC as D4RL's behaviour agents and TorchRL's SAC example run it on MuJoCo."""

    frames: int = 1_000_000  # environment steps in all
    warmup_frames: int = 10_000  # uniform random actions before the first update (a refill on a bare resume)
    frames_per_batch: int = 1_000  # collected between two rounds of updates, one update a frame
    buffer_size: int = 1_000_000  # the replay buffer's capacity, in frames
    batch_size: int = 256
    lr: float = 3e-4
    gamma: float = 0.99
    tau: float = 0.005
    snapshot_every: int = 10_000
    eval_episodes: int = 5
    checkpoint_every: int = 50_000
    seed: int = 0

    def __post_init__(self):
        # snapshots and checkpoints are taken between a batch's updates and the next batch
        if self.frames_per_batch < 1:
            raise ValueError(f"frames_per_batch={self.frames_per_batch} (--frames-per-batch) must be at least 1.")
        for name, flag in (("snapshot_every", "--snapshot-every"), ("checkpoint_every", None)):
            every = getattr(self, name)
            if every % self.frames_per_batch:
                raise ValueError(f"{name}={every}{f' ({flag})' if flag else ''} is not a multiple of frames_per_batch="
                                 f"{self.frames_per_batch} (--frames-per-batch): a snapshot or checkpoint is taken "
                                 "after a whole batch; make it a multiple.")


@dataclass(frozen=True)
class Snapshot:
    """A kept actor: its weights, after how many frames, and the mean return of its stochastic policy."""

    frames: int
    mean_return: float
    weights: dict


def make_sac_actor(obs_dim: int, act_dim: int, low, high):
    """SAC's actor: a 2×256 MLP giving a TanhNormal's location and scale, squashed into [low, high]."""
    from tensordict.nn import NormalParamExtractor
    from torchrl.modules import MLP, ProbabilisticActor, TanhNormal

    net = nn.Sequential(MLP(obs_dim, 2 * act_dim, num_cells=list(HIDDEN), activation_class=nn.ReLU), NormalParamExtractor())
    return ProbabilisticActor(
        TensorDictModule(net, ["observation"], ["loc", "scale"]), in_keys=["loc", "scale"],
        distribution_class=TanhNormal, distribution_kwargs={"low": low, "high": high}, return_log_prob=False,
    )


def _make_critic(obs_dim: int, act_dim: int):
    from torchrl.modules import MLP, ValueOperator

    return ValueOperator(MLP(obs_dim + act_dim, 1, num_cells=list(HIDDEN), activation_class=nn.ReLU),
                         in_keys=["observation", "action"])


def _make_env(env_id: str, seed: int):
    from torchrl.envs import Compose, DoubleToFloat, GymEnv, TransformedEnv

    env = TransformedEnv(GymEnv(env_id), Compose(DoubleToFloat()))
    env.set_seed(seed)
    return env


def snapshot_policy(snapshot: Snapshot, env_id: str):
    """The snapshot's actor (a TorchRL ``ProbabilisticActor``) for ``env_id``'s spaces."""
    import gymnasium as gym

    env = gym.make(env_id)
    space = env.observation_space.shape[0], env.action_space
    env.close()
    obs_dim, action_space = space
    actor = make_sac_actor(obs_dim, action_space.shape[0], torch.as_tensor(action_space.low, dtype=torch.float32),
                           torch.as_tensor(action_space.high, dtype=torch.float32))
    actor.module[0].module.load_state_dict(snapshot.weights)
    return actor


def load_snapshot(path: str | Path) -> Snapshot:
    """Read a snapshot file (weights only: nothing in it runs as code)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    return Snapshot(int(state["frames"]), float(state["mean_return"]), state["weights"])


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _evaluate(actor, env, episodes: int) -> float:
    """Mean return of the actor's stochastic policy (the policy the datasets record) over whole episodes."""
    from torchrl.envs.utils import ExplorationType, set_exploration_type

    returns = []
    with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
        for _ in range(episodes):
            rollout = env.rollout(10_000, actor, break_when_any_done=True)
            returns.append(float(rollout["next", "reward"].sum()))
    return sum(returns) / len(returns)


def train_behaviour(name: str, folder: str | Path, settings: SACSettings = SACSettings(), progress: bool = True,
                    stop: Callable[[], bool] | None = None) -> Path:
    """Train (or go on training) SAC on ``ENVIRONMENTS[name]`` in ``folder``; returns the folder.

    ``folder/snapshots/frames-XXXXXXX.pt`` every ``settings.snapshot_every`` frames, ``folder/log.jsonl`` a line a
    snapshot (frames, return, losses, entropy coefficient, wall time), ``folder/settings.json`` the settings;
    a folder that holds other settings is refused. ``stop`` (e.g. a signal's flag) is asked after each collected
    batch and its updates: when it says so, the training checkpoints there and returns.
    """
    from tqdm.auto import tqdm
    from torchrl.collectors import Collector
    from torchrl.data import LazyTensorStorage, ReplayBuffer
    from torchrl.objectives import SACLoss, SoftUpdate

    if name not in ENVIRONMENTS:
        raise KeyError(f"No behaviour environment {name!r}; available: {sorted(ENVIRONMENTS)}.")
    folder = Path(folder)
    (folder / "snapshots").mkdir(parents=True, exist_ok=True)
    _check_settings(folder, name, settings)
    torch.manual_seed(settings.seed)
    env = _make_env(ENVIRONMENTS[name], settings.seed)
    eval_env = _make_env(ENVIRONMENTS[name], settings.seed + 10_000)
    spec = env.action_spec
    obs_dim, act_dim = env.observation_spec["observation"].shape[-1], spec.shape[-1]
    actor = make_sac_actor(obs_dim, act_dim, spec.space.low, spec.space.high)
    loss = SACLoss(actor, _make_critic(obs_dim, act_dim), num_qvalue_nets=2, loss_function="l2", alpha_init=1.0,
                   action_spec=spec)
    loss.make_value_estimator(gamma=settings.gamma)
    target_update = SoftUpdate(loss, tau=settings.tau)
    optimizers = {
        "actor": torch.optim.Adam(loss.actor_network_params.values(True, True), lr=settings.lr),
        "qvalue": torch.optim.Adam(loss.qvalue_network_params.values(True, True), lr=settings.lr),
        "alpha": torch.optim.Adam([loss.log_alpha], lr=settings.lr),
    }
    buffer = ReplayBuffer(storage=LazyTensorStorage(settings.buffer_size), batch_size=settings.batch_size)
    frames = _resume(folder, loss, optimizers, buffer)
    refill = settings.warmup_frames if frames > 0 and len(buffer) == 0 else 0
    collector = Collector(
        env, actor, frames_per_batch=settings.frames_per_batch, total_frames=settings.frames - frames + refill,
        init_random_frames=settings.warmup_frames if frames == 0 else 0, auto_register_policy_transforms=False,
    )
    log = (folder / "log.jsonl").open("a")
    bar = tqdm(total=settings.frames, initial=frames, desc=f"SAC on {ENVIRONMENTS[name]}", unit="frame", disable=not progress)
    started, metrics = time.perf_counter(), {}
    try:
        for batch in collector:
            buffer.extend(batch.reshape(-1))
            if refill > 0:  # a bare resume: the buffer first holds the current policy's frames, which count no frames
                refill -= batch.numel()
                continue
            frames += batch.numel()
            bar.update(batch.numel())
            if len(buffer) >= settings.warmup_frames:
                metrics = _updates(loss, optimizers, target_update, buffer, batch.numel())
            if frames % settings.snapshot_every == 0:
                mean_return = _evaluate(actor, eval_env, settings.eval_episodes)
                weights = {k: v.detach().clone() for k, v in actor.module[0].module.state_dict().items()}
                _save_atomic({"frames": frames, "mean_return": mean_return, "weights": weights},
                             folder / "snapshots" / f"frames-{frames:07d}.pt")
                log.write(json.dumps({"frames": frames, "mean_return": mean_return, "wall_s": time.perf_counter() - started,
                                      **metrics}) + "\n")
                log.flush()
                bar.set_postfix(ret=f"{mean_return:.0f}")
            if frames % settings.checkpoint_every == 0 or frames >= settings.frames:
                _checkpoint(folder, frames, loss, optimizers, buffer)
            if frames >= settings.frames:
                break
            if stop is not None and stop():
                _checkpoint(folder, frames, loss, optimizers, buffer)
                break
    finally:
        collector.shutdown()
        bar.close()
        log.close()
    return folder


def _updates(loss, optimizers, target_update, buffer, count: int) -> dict:
    """``count`` SAC updates: critics, actor and entropy coefficient from one loss call, each its own Adam."""
    for _ in range(count):
        out = loss(buffer.sample())
        total = out["loss_actor"] + out["loss_qvalue"] + out["loss_alpha"]
        for optimizer in optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        total.backward()
        for optimizer in optimizers.values():
            optimizer.step()
        target_update.step()
    return {key: float(out[key].detach()) for key in ("loss_actor", "loss_qvalue", "loss_alpha", "alpha", "entropy")}


def _check_settings(folder: Path, name: str, settings: SACSettings) -> None:
    path = folder / "settings.json"
    wanted = {"environment": name, **asdict(settings)}
    if path.exists():
        kept = json.loads(path.read_text())
        differ = sorted(k for k in wanted if kept.get(k) != wanted[k] and k != "frames")
        if differ:
            raise ValueError(f"{folder} trains with other settings ({', '.join(f'{k}={kept.get(k)!r}' for k in differ)}); "
                             f"pass the same settings or another folder.")
    path.write_text(json.dumps(wanted, indent=1) + "\n")


def _checkpoint(folder: Path, frames: int, loss, optimizers, buffer) -> None:
    state = {"frames": frames, "loss": loss.state_dict(), "rng": torch.get_rng_state(),
             "optimizers": {k: o.state_dict() for k, o in optimizers.items()}}
    _save_atomic(state, folder / "checkpoint.pt")
    tmp = folder / "buffer.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    buffer.dumps(tmp)
    shutil.rmtree(folder / "buffer", ignore_errors=True)
    os.replace(tmp, folder / "buffer")
    (folder / "buffer-frames").write_text(f"{frames}\n")


def _resume(folder: Path, loss, optimizers, buffer) -> int:
    """The frames already trained (0 for a new folder); loads the checkpoint, and the buffer when it matches."""
    path = folder / "checkpoint.pt"
    if not path.exists():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    loss.load_state_dict(state["loss"])
    for key, optimizer in optimizers.items():
        optimizer.load_state_dict(state["optimizers"][key])
    torch.set_rng_state(state["rng"])
    frames = int(state["frames"])
    marker = folder / "buffer-frames"
    if marker.exists() and marker.read_text().strip() == str(frames) and (folder / "buffer").exists():
        buffer.loads(folder / "buffer")
    return frames
