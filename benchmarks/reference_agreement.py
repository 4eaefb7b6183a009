"""How far the package's update and the one-file reference (``plain_iql.py``) drift apart from the same weights on
the same batches, beside how far the reference drifts from itself when every weight is moved by one float32 ulp.

All run CORL's order (the package's ``IQLUpdate(order="summed")``: V(s') and the advantage from V before its step),
float32, on the dataset's transitions standardised and reward-scaled as the locomotion study trains them. The
package's eager step and the reference differ in float rounding and in one constant: the package sums the two
critics' squared errors, the reference averages them (Adam sees the factor only through its ε). ``--compiled`` adds
the package's compiled step (the job's CPU default) against its eager step. A bug in a step shows within the first
updates, before rounding has grown; where a pair drifts no faster than the reference from its nudged self, the two
are the same algorithm and later differences are the training's own sensitivity to rounding.

    python benchmarks/reference_agreement.py --dataset iql_torchrl/walker2d/medium-replay-v0 --steps 5000 \\
        --compiled --json benchmarks/results/reference_agreement_walker2d-medium-replay.json

``--start RUN --member K`` starts every training from member K of a saved run instead of fresh weights (its
networks and target critics; fresh optimizer states): the steps compared at a trained state. Per network it prints
the relative root-mean-square difference of the parameters, ‖θ₁ − θ₂‖ / ‖θ₂‖, and for the policies the
root-mean-square difference of their mean actions on 4,096 dataset states.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import minari
import numpy as np
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule

import plain_iql  # benchmarks/, beside this file
from iql_torchrl import IQLLoss, make_iql_networks
from iql_torchrl.data import load_minari_dataset
from iql_torchrl.runs.builders import actor_from_checkpoint, loss_from_checkpoint
from iql_torchrl.runs.evaluation import evaluate_policy
from iql_torchrl.runs.checkpoint import load_run_checkpoint
from iql_torchrl.runs.sweep import sweep_grid
from iql_torchrl.step.update import IQLUpdate

NETWORKS = ("actor", "critics", "value")


def linear(net: torch.nn.Sequential) -> list[torch.Tensor]:
    """An MLP's weights and biases, layer by layer."""
    return [t for layer in net if isinstance(layer, torch.nn.Linear) for t in (layer.weight, layer.bias)]


def actor_tensors(actor: plain_iql.Actor) -> list[torch.Tensor]:
    """The reference actor's log-std, then its mean network's weights and biases: the package's order."""
    return [actor.log_std, *linear(actor.mean)]


def plain_tensors(agent: plain_iql.PlainIQL) -> dict[str, list[torch.Tensor]]:
    """The reference's parameters per network, in the package's order (log-std first, then each linear layer); the
    twin critics' stacked (copies: read them, write into each critic's own)."""
    stacked = lambda nets: [torch.stack(pair) for pair in zip(*(linear(q) for q in nets))]
    return {"actor": actor_tensors(agent.actor), "critics": stacked(agent.q),
            "value": linear(agent.v), "targets": stacked(agent.q_target)}


def package_tensors(loss: IQLLoss) -> dict[str, list[torch.Tensor]]:
    """The package's parameters per network, in :func:`plain_tensors`' order."""
    by_name = lambda td: [td[key] for key in sorted(td.keys(True, True), key=_layer_order)]
    return {"actor": by_name(loss.actor_network_params), "critics": by_name(loss.qvalue_network_params),
            "value": by_name(loss.value_network_params), "targets": by_name(loss.target_qvalue_network_params)}


def _layer_order(key: tuple[str, ...]) -> tuple:
    """log_std first, then layers by index, weight before bias."""
    return (-1, False) if key[-1] == "log_std" else (int(key[-2]), key[-1] != "weight")


@torch.no_grad()
def load_into_plain(agent: plain_iql.PlainIQL, tensors: dict[str, list[torch.Tensor]]) -> None:
    for target, source in zip(actor_tensors(agent.actor), tensors["actor"]):
        target.copy_(source)
    for target, source in zip(linear(agent.v), tensors["value"]):
        target.copy_(source)
    for nets, name in ((agent.q, "critics"), (agent.q_target, "targets")):
        for k, net in enumerate(nets):
            for target, source in zip(linear(net), tensors[name]):
                target.copy_(source[k])


@torch.no_grad()
def load_into_package(loss: IQLLoss, tensors: dict[str, list[torch.Tensor]]) -> None:
    for name, targets in package_tensors(loss).items():
        for target, source in zip(targets, tensors[name]):
            target.copy_(source)


def trained_member(run_dir: Path, member: int) -> dict[str, list[torch.Tensor]]:
    """Member ``member``'s networks of a saved run of the main job."""
    loss, _ = loss_from_checkpoint(load_run_checkpoint(run_dir, map_location="cpu"), "cpu", member)
    return package_tensors(loss)


def relative_difference(first: list[torch.Tensor], second: list[torch.Tensor]) -> float:
    squared = sum(float((a.detach() - b.detach()).double().pow(2).sum()) for a, b in zip(first, second))
    return (squared / sum(float(b.detach().double().pow(2).sum()) for b in second)) ** 0.5


@torch.no_grad()
def action_difference(actor_a, actor_b, states: torch.Tensor) -> float:
    return float((actor_a(states).mean - actor_b(states).mean).pow(2).mean().sqrt())


@torch.no_grad()
def package_actor(loss: IQLLoss, obs_dim: int, act_dim: int) -> plain_iql.Actor:
    """The package's current policy as the reference's actor class (the same layout, its weights copied in)."""
    actor = plain_iql.Actor(obs_dim, act_dim)
    for target, source in zip(actor_tensors(actor), package_tensors(loss)["actor"]):
        target.copy_(source)
    return actor


def package_update(obs_dim: int, act_dim: int, total_steps: int, mode: str) -> tuple[IQLLoss, IQLUpdate]:
    loss = IQLLoss(*make_iql_networks(obs_dim, act_dim), temperature=3.0, expectile=0.7)
    loss.make_value_estimator(gamma=0.99)
    return loss, IQLUpdate(loss, lr=3e-4, tau=0.005, total_steps=total_steps, order="summed", mode=mode,
                           precision="fp32")


def compare_data(data: dict[str, torch.Tensor], mean: np.ndarray, std: np.ndarray, buffer) -> dict:
    """The reference's arrays against the package's replay buffer of the same set (standardised, rewards scaled):
    the largest difference of each field, in the order both read the episodes, and of the statistics."""
    stored = buffer.storage.get(slice(None))
    theirs = {"s": stored["observation"], "s2": stored["next", "observation"], "a": stored["action"],
              "r": stored["next", "reward"].squeeze(-1), "d": stored["next", "terminated"].squeeze(-1)}
    metadata = buffer.metadata
    return {"transitions": [len(data["s"]), len(stored)],
            **{key: float((data[key].double() - theirs[key].double()).abs().max()) for key in theirs},
            "mean": float(np.abs(np.asarray(metadata.observation_mean) - mean).max()),
            "std": float(np.abs(np.asarray(metadata.observation_std) - std).max())}


class _MeanAction(torch.nn.Module):
    """The reference's policy as the package's evaluation calls it: observation → mean action."""

    def __init__(self, actor: plain_iql.Actor):
        super().__init__()
        self.actor = actor

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        return self.actor(observation).mean.clamp(-1, 1)


class _AsNormal(torch.nn.Module):
    """The package's policy head as the reference's evaluation calls it: observation → Normal(loc, scale)."""

    def __init__(self, head: torch.nn.Module):
        super().__init__()
        self.head = head

    def forward(self, observation: torch.Tensor) -> torch.distributions.Normal:
        return torch.distributions.Normal(*self.head(observation))


def policies(folder: Path, metadata) -> list[tuple[str, torch.nn.Module, TensorDictModule, object]]:
    """``(name, the policy for the reference's evaluation, for the package's, its metadata)`` of a ``plain_iql.py``
    folder (evaluated with ``metadata``, the data's) or of every member of a run of the main job."""
    if (folder / "curve.json").exists():
        state = torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True)["agent"]["actor"]
        actor = plain_iql.Actor(state["mean.0.weight"].shape[1], state["log_std"].numel())
        actor.load_state_dict(state)
        return [(folder.name, actor, TensorDictModule(_MeanAction(actor), ["observation"], ["action"]), metadata)]
    state = load_run_checkpoint(folder, map_location="cpu")
    members = len(sweep_grid(state["config"].get("sweep"))) * state["config"].get("num_seeds", 1)
    found = []
    for k in range(members):
        actor, own_metadata = actor_from_checkpoint(state, "cpu", k)
        found.append((f"{folder.name}[{k}]", _AsNormal(actor.module[0].module), actor, own_metadata))
    return found


def cross_evaluate(folders: list[Path], dataset_id: str, metadata, episodes: int) -> list[dict]:
    """Each policy scored by both evaluations on the same environment seeds (10,000 + episode): the reference's
    (``plain_iql.evaluate``: one env, the mean action) and the package's (``evaluate_policy``: a vector env)."""
    dataset = minari.load_dataset(dataset_id)
    env = dataset.recover_environment(eval_env=True)
    score = lambda returns: 100 * float(np.mean(minari.get_normalized_score(dataset, np.asarray(returns))))
    rows = []
    for folder in folders:
        for name, plain_policy, package_policy, own in policies(folder, metadata):
            mean, std = np.asarray(own.observation_mean), np.asarray(own.observation_std)
            rows.append({"policy": name, "reference": score(plain_iql.evaluate(plain_policy, env, mean, std, episodes)),
                         "package": evaluate_policy(package_policy, own, episodes=episodes, seed=10_000)["normalized_score"]})
    return rows


def drift(data: dict[str, torch.Tensor], args) -> tuple[list[str], list[dict]]:
    """Trains the reference, its nudged copy and the package's step(s) side by side; the pairs compared and, at each
    ``--report`` update, their differences."""
    obs_dim, act_dim = data["s"].shape[1], data["a"].shape[1]
    settings = argparse.Namespace(steps=args.total_steps, beta=3.0, iql_tau=0.7, discount=0.99)
    torch.manual_seed(args.seed)
    reference = plain_iql.PlainIQL(obs_dim, act_dim, settings)
    start = trained_member(args.start, args.member) if args.start else plain_tensors(reference)
    load_into_plain(reference, start)
    packages = {"eager": package_update(obs_dim, act_dim, args.total_steps, "eager")}
    if args.compiled:
        packages["compiled"] = package_update(obs_dim, act_dim, args.total_steps, "compile")
    for loss, _ in packages.values():
        load_into_package(loss, start)
    nudged = plain_iql.PlainIQL(obs_dim, act_dim, settings)
    load_into_plain(nudged, start)
    with torch.no_grad():
        for tensor in (p for net in (nudged.actor, nudged.v, nudged.q, nudged.q_target) for p in net.parameters()):
            tensor.copy_(torch.nextafter(tensor, torch.full_like(tensor, float("inf"))))
    as_actor = lambda name: package_actor(packages[name][0], obs_dim, act_dim)
    # each pair: the tensors and policy of the training compared, then those of the one it is compared with
    pairs = {"package": lambda: (package_tensors(packages["eager"][0]), as_actor("eager"), plain_tensors(reference),
                                 reference.actor),
             "nudged": lambda: (plain_tensors(nudged), nudged.actor, plain_tensors(reference), reference.actor)}
    if args.compiled:
        pairs["compiled"] = lambda: (package_tensors(packages["compiled"][0]), as_actor("compiled"),
                                     package_tensors(packages["eager"][0]), as_actor("eager"))
    states = data["s"][torch.randint(len(data["s"]), (4096,), generator=torch.Generator().manual_seed(1))]
    report_at = {int(s) for s in args.report.split(",")} | {args.steps}
    generator, rows, started = torch.Generator().manual_seed(args.seed), [], time.perf_counter()
    for step in range(1, args.steps + 1):
        index = torch.randint(len(data["s"]), (256,), generator=generator)
        s, a, r, s2, d = (data[key][index] for key in ("s", "a", "r", "s2", "d"))
        reference.update(s, a, r, s2, d)
        nudged.update(s, a, r, s2, d)
        batch = TensorDict({"observation": s, "action": a, ("next", "observation"): s2, ("next", "reward"): r[:, None],
                            ("next", "terminated"): d[:, None].bool(), ("next", "done"): d[:, None].bool()}, [256])
        for _, update in packages.values():
            update(batch.clone())
        if step in report_at:
            row = {"step": step}
            for name, tensors in pairs.items():
                mine, my_actor, theirs, their_actor = tensors()
                row |= {f"{name}_{net}": relative_difference(mine[net], theirs[net]) for net in NETWORKS}
                row[f"{name}_action"] = action_difference(my_actor, their_actor, states)
            rows.append(row)
            print(f"update {step} ({time.perf_counter() - started:.0f} s)", flush=True)
    return list(pairs), rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="iql_torchrl/walker2d/medium-replay-v0")
    parser.add_argument("--steps", type=int, default=5000, help="updates side by side (0: none)")
    parser.add_argument("--total-steps", type=int, default=300_000, help="the actor's cosine length (the runs')")
    parser.add_argument("--report", default="1,10,100,300,1000,2000,5000")
    parser.add_argument("--compiled", action="store_true", help="also the package's compiled step against its eager one")
    parser.add_argument("--start", type=Path, help="a saved run of the main job to start every training from")
    parser.add_argument("--member", type=int, default=0, help="which of --start's seeds")
    parser.add_argument("--evaluate", nargs="*", type=Path, default=[],
                        help="plain_iql.py folders and runs of the main job whose policies both evaluations score")
    parser.add_argument("--episodes", type=int, default=20, help="episodes of each --evaluate policy, each evaluation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data, mean, std = plain_iql.load_transitions(minari.load_dataset(args.dataset), True, True)
    buffer = load_minari_dataset(args.dataset, reward_transform="locomotion", normalize_observations=True)
    same = compare_data(data, mean, std, buffer)
    print(f"{args.dataset}: {same['transitions'][0]:,} transitions read by the reference, {same['transitions'][1]:,} "
          "in the package's buffer; largest difference, in the same order: "
          + ", ".join(f"{key} {same[key]:.1e}" for key in ("s", "a", "r", "s2", "d")) +
          f"; the statistics' mean {same['mean']:.1e}, std {same['std']:.1e}\n")
    names, rows = drift(data, args) if args.steps else ([], [])
    if rows:
        start = f"member {args.member} of {args.start}" if args.start else "fresh weights"
        print(f"\nFrom {start}, on the same batches: relative parameter difference ‖θ − θ_ref‖ / ‖θ_ref‖ per network "
              "and the policies' mean-action rms difference\n")
        headers = {"package": "package eager vs reference", "compiled": "package compiled vs eager",
                   "nudged": "reference nudged one ulp vs reference"}
        print("| updates | " + " | ".join(f"{headers[name]}: actor | critics | value | action" for name in names) + " |")
        print("|---|" + "---|" * (4 * len(names)))
        for row in rows:
            cells = [f"{row[f'{name}_{net}']:.1e}" for name in names for net in (*NETWORKS, "action")]
            print(f"| {row['step']:,} | " + " | ".join(cells) + " |")
    scores = cross_evaluate(args.evaluate, args.dataset, buffer.metadata, args.episodes) if args.evaluate else []
    if scores:
        print(f"\nEach policy, {args.episodes} episodes on the same environment seeds (10,000 + episode), "
              "normalized score\n\n| policy | the reference's evaluation | the package's evaluation |\n|---|---|---|")
        for row in scores:
            print(f"| {row['policy']} | {row['reference']:.1f} | {row['package']:.1f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        settings = {key: [str(v) for v in value] if isinstance(value, list) else str(value) if isinstance(value, Path)
                    else value for key, value in vars(args).items()}
        args.json.write_text(json.dumps({"settings": settings, "data": same, "drift": rows, "evaluations": scores},
                                        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
