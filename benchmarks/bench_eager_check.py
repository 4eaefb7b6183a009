"""How often the eager check stops a correct compiled step (its false alarms), and how far a planted fault is over it.

    python benchmarks/bench_eager_check.py                         # 50 seeds, fp32 and bf16
    python benchmarks/bench_eager_check.py --seeds 100 --json benchmarks/results/results_eager_check.json
    python benchmarks/bench_eager_check.py --cost 5 --threads 2   # what the check costs the default job

At the job's shapes (obs 17, action 6, 2×256 networks, batch 256, paper order), the step is compiled once per
precision; each seed then loads its own initial networks and a fresh optimizer state into it, in place, and
takes the calls a run checks (the one that compiles and the ``eager_checks`` after it: 3) on its own batches.
Every call is compared with the eager step as a run compares it, and the largest difference of any tensor of
each network is recorded, in learning rates (the check's bound is ``tolerance(precision)`` of it). A false alarm
is a seed where any checked call of a correct step goes over the bound.

The planted fault steps the actor's two 6-element tensors (log-std and the mean head's bias) the wrong way at
every compiled update (eager steps them right): each is then about two learning rates off.

``--members K`` checks the vmapped step of K stacked seeds instead (as ``--num-seeds`` and ``--sweep`` run it),
each member of a seed's ensemble initialised from its own network seed; the planted fault then steps every
member's two small tensors the wrong way.

On a CPU without native bf16 (AVX2 only) every bf16 GEMM is emulated: the rounding is bf16's all the same,
only slower. The host line of the output says which CPU ran it.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import warnings
from pathlib import Path

import torch
from tensordict import TensorDict

sys.path.insert(0, str(Path(__file__).resolve().parent))

from host import cpu_name  # noqa: E402

from iql_torchrl import IQLLoss, IQLUpdate, make_iql_networks  # noqa: E402
from iql_torchrl.objectives.ensemble import SeedEnsemble  # noqa: E402
from iql_torchrl.step.eager_check import tolerance  # noqa: E402

OBS, ACT, HIDDEN, BATCH, DATA = 17, 6, (256, 256), 256, 20_000
NETWORKS = ("value", "actor", "qvalue", "target_qvalue")


class WrongWaySmallActorTensors(IQLUpdate):
    """Planted: compiled, the actor's ACT-element tensors (log-std, the mean head's bias) step the wrong way."""

    def _optimizer_step(self, group, grads):
        members = getattr(self.loss, "num_seeds", 1)
        small = [p for p in self.params[group] if p.numel() == ACT * members] if group == "actor" else []
        if not torch.compiler.is_compiling():
            small = []
        before = [p.clone() for p in small]
        super()._optimizer_step(group, grads)
        for p, b in zip(small, before):
            p.copy_(2 * b - p)


def transitions(n: int, seed: int = 0, obs: int = OBS, act: int = ACT) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    return TensorDict({
        "observation": torch.randn(n, obs, generator=g),
        "action": torch.rand(n, act, generator=g) * 2 - 1,
        ("next", "observation"): torch.randn(n, obs, generator=g),
        ("next", "reward"): torch.randn(n, 1, generator=g),
        ("next", "terminated"): torch.rand(n, 1, generator=g) < 0.05,
        ("next", "done"): torch.rand(n, 1, generator=g) < 0.05,
    }, [n])


def make_loss(seed: int, members: int = 1) -> IQLLoss | SeedEnsemble:
    """One loss (``members`` 1), or a ``SeedEnsemble`` of ``members`` losses, from network seeds ``seed·members`` on."""
    def single(s):
        torch.manual_seed(s)
        return IQLLoss(*make_iql_networks(OBS, ACT, hidden_sizes=HIDDEN))
    return single(seed) if members == 1 else SeedEnsemble([single(seed * members + m) for m in range(members)])


def whole_network(gaps) -> float:
    """A network's root-mean-square difference over all its elements, in learning rates: the bound a check per
    network would apply."""
    return math.sqrt(sum(g.rms**2 * g.numel for g in gaps) / sum(g.numel for g in gaps)) / gaps[0].lr


def checked_runs(precision: str, seeds: int, calls: int, planted: bool,
                 members: int = 1) -> list[list[dict[str, float]]]:
    """For each seed, each checked call's largest tensor difference per network, and the actor's difference over
    the whole network (``"actor as a whole"``), in learning rates."""
    data = transitions(DATA)
    loss = make_loss(0, members)
    kind = WrongWaySmallActorTensors if planted else IQLUpdate
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a forced bf16 on a CPU that emulates it says so
        update = kind(loss, data=data, mode="compile", precision=precision, total_steps=10_000, eager_checks=10**9)
    check = update.runner.check
    check.tolerance = float("inf")  # record every difference; the bound is applied below
    fresh_state = update.state_dict()
    runs = []
    for seed in range(seeds):
        loss.load_state_dict(make_loss(seed, members).state_dict())
        update.load_state_dict(fresh_state)
        g = torch.Generator().manual_seed(1_000 + seed)
        run = []
        for _ in range(calls):
            check.largest = {}
            update(torch.randint(0, DATA, (BATCH,) if members == 1 else (members, BATCH), generator=g))
            run.append({**check.largest, "actor as a whole": whole_network(check.last["actor"])})
        runs.append(run)
    return runs


def check_cost(rounds: int, steps: int = 10_000) -> dict:
    """What the eager check adds to a run at the default job's shapes (pendulum: obs 3, action 1; 2×256, batch 256,
    fp32): calls 2 and 3 of a checked and of an unchecked compiled step (the first call compiles, from torch's caches
    after round 0, and its time swings with the disk), rounds alternating; the check of the first call costs as
    much as each of the others', so a run pays 3/2 of the difference. Also the unchecked step's time an update
    after them."""
    import time

    torch.manual_seed(0)
    data = transitions(DATA, obs=3, act=1)
    batches = [torch.randint(0, DATA, (BATCH,)) for _ in range(23)]
    first = {"checked": [], "unchecked": []}
    later = []
    for round_ in range(rounds + 1):  # round 0 fills torch's caches: not counted
        for name, checks in (("checked", 2), ("unchecked", 0)):
            torch.manual_seed(round_)
            loss = IQLLoss(*make_iql_networks(3, 1, hidden_sizes=HIDDEN))
            update = IQLUpdate(loss, data=data, mode="compile", precision="fp32", total_steps=steps,
                               eager_checks=checks)
            times = []
            for batch in batches:
                start = time.perf_counter()
                update(batch)
                times.append(time.perf_counter() - start)
            if round_:
                first[name].append(sum(times[1:3]))
                if name == "unchecked":
                    later.append(statistics.median(times[3:]))
    extra = 1.5 * (statistics.median(first["checked"]) - statistics.median(first["unchecked"]))
    per_update = statistics.median(later)
    return {"rounds": rounds, "calls_2_3_checked_s": first["checked"], "calls_2_3_unchecked_s": first["unchecked"],
            "update_s": per_update, "check_s": extra, "run_updates": steps,
            "fraction_of_run": extra / (extra + steps * per_update)}


def summary(runs: list[list[dict[str, float]]], bound: float) -> dict:
    seed_worst = [max(call[name] for call in run for name in NETWORKS) for run in runs]
    return {
        "seeds": len(runs),
        "over_bound": sum(worst > bound for worst in seed_worst),
        "largest": {name: max(call[name] for run in runs for call in run) for name in (*NETWORKS, "actor as a whole")},
        "median_of_seed_worst": statistics.median(seed_worst),
        "smallest_of_seed_worst": min(seed_worst),
        "seed_worst": seed_worst,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=50)
    parser.add_argument("--planted-seeds", type=int, default=10)
    parser.add_argument("--calls", type=int, default=3, help="checked calls a run takes (1 + eager_checks)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--members", type=int, default=1, help="stacked seeds a step trains (vmapped)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--cost", type=int, metavar="ROUNDS", help="measure what the check costs the default job "
                        "(ROUNDS alternating rounds) instead of its false alarms")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.cost:
        cost = check_cost(args.cost)
        cost.update(host=cpu_name(), torch=torch.__version__, threads=args.threads)
        print(f"host: {cost['host']}; torch {cost['torch']}; {args.threads} thread(s); {args.cost} rounds")
        print("| calls 2-3, checked (ms) | calls 2-3, unchecked (ms) | the check, 3 calls (ms) | an update after (ms) | "
              "share of a 10,000-update run |")
        print("|---|---|---|---|---|")
        print(f"| {statistics.median(cost['calls_2_3_checked_s']) * 1e3:.1f} | "
              f"{statistics.median(cost['calls_2_3_unchecked_s']) * 1e3:.1f} | {cost['check_s'] * 1e3:.1f} | "
              f"{cost['update_s'] * 1e3:.2f} | {100 * cost['fraction_of_run']:.2f}% |")
        if args.json:
            args.json.write_text(json.dumps(cost, indent=1))
        return
    results = {"host": cpu_name(), "torch": torch.__version__, "python": platform.python_version(),
               "threads": args.threads, "members": args.members,
               "shapes": {"obs": OBS, "action": ACT, "hidden": HIDDEN, "batch": BATCH},
               "calls": args.calls, "rows": []}
    for precision in args.precisions:
        bound = tolerance(precision)
        for planted, seeds in ((False, args.seeds), (True, args.planted_seeds)):
            row = {"precision": precision, "step": "planted fault" if planted else "correct", "bound": bound,
                   **summary(checked_runs(precision, seeds, args.calls, planted, args.members), bound)}
            results["rows"].append(row)
            print(f"{precision} {row['step']}: done", flush=True)
    print(f"\nhost: {results['host']}; torch {results['torch']}; {args.threads} thread(s); {args.calls} checked calls a seed; "
          f"{args.members} member(s) a step")
    print("| precision | step | seeds | bound (× lr) | seeds over it | largest tensor: value | actor | qvalue | target | "
          "the actor as a whole | median seed's worst tensor | smallest seed's worst tensor |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        largest = " | ".join(f"{r['largest'][n]:.3g}" for n in (*NETWORKS, "actor as a whole"))
        print(f"| {r['precision']} | {r['step']} | {r['seeds']} | {r['bound']} | {r['over_bound']} | {largest} | "
              f"{r['median_of_seed_worst']:.3g} | {r['smallest_of_seed_worst']:.3g} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
