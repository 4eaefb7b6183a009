"""K seeds vmapped in one process against K sequential single-seed runs: time per update.

    python benchmarks/bench_seeds.py                 # K = 1, 4, 8 at B=256, 2x256 MLPs
    python benchmarks/bench_seeds.py --seeds 1 4 --json seeds.json

"Sequential" is K times the measured single-seed step (what K separate runs cost on this
machine); "vmapped" is one SeedEnsemble step that updates all K agents.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings

import torch

from update_steps import Setup, make_batch, sync
from iql_torchrl import IQLLoss, IQLUpdate, make_iql_networks
from iql_torchrl.objectives.ensemble import SeedEnsemble

warnings.filterwarnings("ignore")


def make_step(setup: Setup, num_seeds: int, mode: str):
    losses = []
    for seed in range(num_seeds):
        torch.manual_seed(seed)
        losses.append(IQLLoss(*make_iql_networks(setup.obs_dim, setup.action_dim, hidden_sizes=setup.hidden_sizes)).to(setup.device))
    loss = losses[0] if num_seeds == 1 else SeedEnsemble(losses)
    return IQLUpdate(loss, total_steps=10**9, mode=mode)


def time_step(step, batch, reps: int, block: int, device) -> list[float]:
    for _ in range(3):
        step(batch)
    samples = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        for _ in range(block):
            step(batch)
        sync(device)
        samples.append((time.perf_counter() - start) * 1000 / block)
    return samples


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mode", default="eager", choices=["eager", "compile"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--block", type=int, default=20)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    setup = Setup(batch_size=args.batch_size, hidden=args.hidden, device=args.device)
    rows = []
    single_ms = None
    for k in sorted(set([1, *args.seeds])):
        batch = make_batch(setup)
        if k > 1:
            batch = torch.stack([make_batch(setup, seed) for seed in range(k)])
        samples = time_step(make_step(setup, k, args.mode), batch, args.reps, args.block, setup.device)
        ms = statistics.median(samples)
        single_ms = ms if k == 1 else single_ms
        rows.append({"num_seeds": k, "ms_per_update": ms, "min": min(samples), "max": max(samples),
                     "sequential_ms": k * single_ms, "speedup_vs_sequential": k * single_ms / ms})
    print(f"\nK seeds vmapped vs K sequential runs, B={setup.batch_size}, 2x{setup.hidden} MLPs, "
          f"{args.device}, {args.mode}, {torch.get_num_threads()} threads")
    print(f"{'K':>3} {'vmapped ms/upd':>15} {'min':>7} {'max':>7} {'sequential ms':>14} {'speed-up':>9}")
    for r in rows:
        print(f"{r['num_seeds']:>3} {r['ms_per_update']:>15.2f} {r['min']:>7.2f} {r['max']:>7.2f} "
              f"{r['sequential_ms']:>14.2f} {r['speedup_vs_sequential']:>8.2f}x")
    result = {"device": args.device, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "batch_size": setup.batch_size, "hidden": setup.hidden, "mode": args.mode, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
