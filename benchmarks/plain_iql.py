"""A plain IQL in one file, as CORL's ``algorithms/offline/iql.py`` runs it: the reference the project's IQL is held to.

Written from CORL's algorithm, in plain PyTorch on a Minari dataset, with none of this package's code between the
reader and the maths, so that a score the package loses and this file keeps points at the package:

* data: every transition of the Minari dataset; ``done`` is ``terminated`` (a time limit bootstraps); states
  standardised by the data's mean and std + 1e-3 (``--normalize``), rewards × 1000 / (max − min episode return)
  for locomotion (``--normalize-reward``);
* networks: 2×256 ReLU MLPs; twin Q on concat(s, a); V(s); a Gaussian actor whose mean is tanh-squashed and whose
  state-independent log-std is clamped to [−20, 2] (log π of the dataset action under that Normal, no tanh on samples);
* one update, in CORL's order: V(s') of the V before this update; V steps on the τ-expectile of min(Q̄1, Q̄2)(s, a) − V(s);
  Q steps on the mean of the two critics' squared errors to r + γ(1 − done)V(s'), then Q̄ ← (1 − 0.005)Q̄ + 0.005Q;
  the actor steps on mean(min(exp(β·(Q̄ − V)), 100) · −log π(a|s)) with the advantage of the V update, its learning
  rate cosine-annealed to 0 over ``--steps``;
* evaluation: the mean action, ``--eval-episodes`` episodes seeded ``10_000 + j``, D4RL-style normalised score × 100.

    python benchmarks/plain_iql.py --dataset iql_torchrl/hopper/medium-expert-v0 --beta 6 --iql-tau 0.5 \\
        --normalize --steps 1000000 --out runs/plain-hopper-me

It writes ``curve.json`` (the evaluations) in ``--out`` and a checkpoint there every evaluation; run it again with
the same ``--out`` to go on from the checkpoint. A run's noisy 10-episode evaluations can be taken again over many
episodes, on environment seeds the run never evaluated on, from its checkpoint or any copy of one (e.g. kept in git):

    python benchmarks/plain_iql.py --dataset iql_torchrl/hopper/medium-v1 --out runs/plain-hopper-medium \
        --evaluate 200 --checkpoints runs/plain-hopper-medium/checkpoint.pt

``--evaluate`` trains nothing; it prints each checkpoint's score and writes them, every episode's included, to
``evaluations.json`` in ``--out``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import minari
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LOG_STD_MIN, LOG_STD_MAX, EXP_ADV_MAX = -20.0, 2.0, 100.0
EVALUATE_ONLY = ("evaluate", "checkpoints", "evaluate_seed")  # options of --evaluate, not of the training


def load_transitions(dataset, normalize: bool, normalize_reward: bool):
    """(s, a, r, s', terminated) as float32 tensors, the state statistics, and the episodes' return range."""
    parts = {key: [] for key in ("s", "a", "r", "s2", "d")}
    returns = []
    for episode in dataset.iterate_episodes():
        if isinstance(episode.observations, dict):
            raise SystemExit(f"{dataset.spec.dataset_id}: dict observations; this reference reads flat ones only.")
        parts["s"].append(episode.observations[:-1])
        parts["s2"].append(episode.observations[1:])
        parts["a"].append(episode.actions)
        parts["r"].append(episode.rewards)
        parts["d"].append(episode.terminations)
        returns.append(float(np.sum(episode.rewards)))
    data = {key: np.concatenate(value).astype(np.float64) for key, value in parts.items()}
    mean, std = data["s"].mean(0), data["s"].std(0) + 1e-3
    if not normalize:
        mean, std = np.zeros_like(mean), np.ones_like(std)
    data["s"], data["s2"] = (data["s"] - mean) / std, (data["s2"] - mean) / std
    if normalize_reward:
        data["r"] = data["r"] * 1000.0 / (max(returns) - min(returns))
    tensors = {key: torch.as_tensor(value, dtype=torch.float32) for key, value in data.items()}
    return tensors, mean, std


def mlp(inputs: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, outputs))


class Actor(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int):
        super().__init__()
        self.mean = mlp(obs_dim, act_dim)
        self.log_std = nn.Parameter(torch.zeros(act_dim))

    def forward(self, s: torch.Tensor) -> torch.distributions.Normal:
        return torch.distributions.Normal(torch.tanh(self.mean(s)), self.log_std.clamp(LOG_STD_MIN, LOG_STD_MAX).exp())


def expectile_loss(u: torch.Tensor, tau: float) -> torch.Tensor:
    return (torch.abs(tau - (u < 0).float()) * u**2).mean()


class PlainIQL:
    def __init__(self, obs_dim: int, act_dim: int, args):
        self.actor, self.v = Actor(obs_dim, act_dim), mlp(obs_dim, 1)
        self.q = nn.ModuleList([mlp(obs_dim + act_dim, 1), mlp(obs_dim + act_dim, 1)])
        self.q_target = copy.deepcopy(self.q).requires_grad_(False)
        self.opt = {name: torch.optim.Adam(net.parameters(), lr=3e-4)
                    for name, net in (("actor", self.actor), ("v", self.v), ("q", self.q))}
        self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt["actor"], args.steps)
        self.args = args

    def _step(self, name: str, loss: torch.Tensor) -> None:
        self.opt[name].zero_grad()
        loss.backward()
        self.opt[name].step()

    def update(self, s, a, r, s2, d) -> None:
        args = self.args
        sa = torch.cat([s, a], -1)
        with torch.no_grad():
            next_v = self.v(s2).squeeze(-1)
            target_q = torch.min(*(q(sa).squeeze(-1) for q in self.q_target))
        adv = target_q - self.v(s).squeeze(-1)
        v_loss = expectile_loss(adv, args.iql_tau)
        self._step("v", v_loss)
        targets = r + (1.0 - d) * args.discount * next_v
        q_loss = sum(F.mse_loss(q(sa).squeeze(-1), targets) for q in self.q) / 2
        self._step("q", q_loss)
        with torch.no_grad():
            for target, online in zip(self.q_target.parameters(), self.q.parameters()):
                target.lerp_(online, 0.005)
        weights = torch.exp(args.beta * adv.detach()).clamp(max=EXP_ADV_MAX)
        actor_loss = (weights * -self.actor(s).log_prob(a).sum(-1)).mean()
        self._step("actor", actor_loss)
        self.schedule.step()

    def state_dict(self) -> dict:
        return {"actor": self.actor.state_dict(), "v": self.v.state_dict(), "q": self.q.state_dict(),
                "q_target": self.q_target.state_dict(), "schedule": self.schedule.state_dict(),
                **{f"opt_{k}": o.state_dict() for k, o in self.opt.items()}}

    def load_state_dict(self, state: dict) -> None:
        for name in ("actor", "v", "q", "q_target", "schedule"):
            getattr(self, name).load_state_dict(state[name])
        for key, optimizer in self.opt.items():
            optimizer.load_state_dict(state[f"opt_{key}"])


@torch.no_grad()
def evaluate(actor: Actor, env, mean, std, episodes: int, first_seed: int = 10_000) -> list[float]:
    returns = []
    for j in range(episodes):
        observation, _ = env.reset(seed=first_seed + j)
        total, done = 0.0, False
        while not done:
            s = torch.as_tensor((observation - mean) / std, dtype=torch.float32)
            action = actor(s[None]).mean[0].clamp(-1, 1).numpy()
            observation, reward, terminated, truncated, _ = env.step(action)
            total, done = total + float(reward), terminated or truncated
        returns.append(total)
    return returns


def d4rl_score(dataset, returns: list[float]) -> tuple[float, np.ndarray]:
    """The episodes' mean D4RL-normalised score × 100, and each episode's (× 100)."""
    normalized = minari.get_normalized_score(dataset, np.asarray(returns))
    return 100 * float(np.mean(normalized)), 100 * np.asarray(normalized, dtype=np.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--beta", type=float, default=3.0)
    parser.add_argument("--iql-tau", type=float, default=0.7)
    parser.add_argument("--discount", type=float, default=0.99)
    parser.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--normalize-reward", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--eval-every", type=int, default=25_000)
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--evaluate", type=int, metavar="EPISODES",
                        help="train nothing: run each of --checkpoints' policies for EPISODES episodes")
    parser.add_argument("--checkpoints", type=Path, nargs="+", help="with --evaluate (default: --out's checkpoint.pt)")
    parser.add_argument("--evaluate-seed", type=int, default=50_000,
                        help="with --evaluate: the first episode's environment seed (default 50000; the run's own "
                             "evaluations are seeded from 10000)")
    args = parser.parse_args()
    if args.evaluate is not None and args.evaluate < 1:
        parser.error(f"--evaluate {args.evaluate}: episodes must be >= 1.")
    if args.checkpoints and args.evaluate is None:
        parser.error("--checkpoints is read with --evaluate only.")

    dataset = minari.load_dataset(args.dataset)
    data, mean, std = load_transitions(dataset, args.normalize, args.normalize_reward)
    env = dataset.recover_environment(eval_env=True)
    if not (np.all(env.action_space.low == -1) and np.all(env.action_space.high == 1)):
        raise SystemExit(f"{args.dataset}: actions in {env.action_space}; this reference acts in [-1, 1] only.")
    torch.manual_seed(args.seed)
    agent = PlainIQL(data["s"].shape[1], data["a"].shape[1], args)
    if args.evaluate is not None:
        evaluate_checkpoints(agent, dataset, env, mean, std, args)
        return
    generator = torch.Generator().manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint, curve_path = args.out / "checkpoint.pt", args.out / "curve.json"
    step, curve = 0, []
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        agent.load_state_dict(state["agent"])
        generator.set_state(state["generator"])
        step, curve = int(state["step"]), json.loads(curve_path.read_text())["curve"]
        print(f"resuming at update {step}")
    started = time.perf_counter()
    while step < args.steps:
        index = torch.randint(len(data["s"]), (256,), generator=generator)
        agent.update(*(data[key][index] for key in ("s", "a", "r", "s2", "d")))
        step += 1
        if step % args.eval_every == 0 or step == args.steps:
            returns = evaluate(agent.actor, env, mean, std, args.eval_episodes)
            score, _ = d4rl_score(dataset, returns)
            curve.append({"step": step, "score": score, "return": float(np.mean(returns))})
            print(f"update {step}: score {score:.1f} ({(time.perf_counter() - started) / 60:.1f} min)", flush=True)
            settings = {k: str(v) for k, v in vars(args).items() if k not in EVALUATE_ONLY}
            curve_path.write_text(json.dumps({"settings": settings, "curve": curve}, indent=1) + "\n")
            tmp = checkpoint.with_suffix(".tmp")
            torch.save({"agent": agent.state_dict(), "generator": generator.get_state(), "step": step}, tmp)
            os.replace(tmp, checkpoint)


def evaluate_checkpoints(agent: PlainIQL, dataset, env, mean, std, args) -> None:
    """Each of ``args.checkpoints``' policies over ``args.evaluate`` episodes: printed, and written to evaluations.json."""
    paths = args.checkpoints or [args.out / "checkpoint.pt"]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise SystemExit(f"--evaluate: no checkpoint at {', '.join(missing)}.")
    results = []
    for path in paths:
        state = torch.load(path, weights_only=True)
        agent.actor.load_state_dict(state["agent"]["actor"])
        returns = evaluate(agent.actor, env, mean, std, args.evaluate, first_seed=args.evaluate_seed)
        score, episode_scores = d4rl_score(dataset, returns)
        spread = float(np.std(episode_scores))
        results.append({"checkpoint": str(path), "step": int(state["step"]), "score": score, "score_std": spread,
                        "episode_scores": episode_scores.tolist()})
        print(f"{path}: update {int(state['step'])}: {score:.1f} ± {spread:.1f} over {args.evaluate} episodes", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {"episodes": args.evaluate, "first_seed": args.evaluate_seed, "dataset": args.dataset}
    (args.out / "evaluations.json").write_text(json.dumps({"settings": settings, "evaluations": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
