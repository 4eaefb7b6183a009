"""A sweep of settings in one run against its members trained one after another: member-updates per second.

    python benchmarks/bench_sweep.py                   # 3 β × 2 τ, 1 seed: 6 members, 5,000 updates each
    python benchmarks/bench_sweep.py --sweep temperature=0,3,6 expectile=0.5,0.7 --steps 20000 --json sweep.json

Both sides are the main job (``examples/iql_offline.py``'s ``train``) with its defaults, on the same dataset
and seed: one run with ``--sweep`` (every member vmapped), then one run per setting. Member-updates/s is the
members a step updates × that run's updates/s (the runs' own rate: compilation, evaluations and checkpoints
left out); the sequential side's is the members over the sum of their runs' seconds per update. Wall time
counts everything each side's runs did (data loading, compilation, evaluations). Run it alone on the host:
another process on the cores makes both numbers meaningless.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # the main job: iql_offline.train
from iql_offline import train  # noqa: E402
from iql_torchrl.runs.config import OfflineConfig  # noqa: E402
from iql_torchrl.runs.sweep import setting_label, sweep_grid, sweep_problem  # noqa: E402


def timed_run(**settings) -> tuple[dict, float]:
    """One run of the main job: its summary and its wall seconds."""
    started = time.perf_counter()
    summary = train(OfflineConfig(**settings))
    return summary, time.perf_counter() - started


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", nargs="+", default=["temperature=0,3,6", "expectile=0.5,0.7"])
    parser.add_argument("--dataset", default=OfflineConfig.dataset)
    parser.add_argument("--steps", type=int, default=5_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if (problem := sweep_problem(args.sweep)) is not None:
        parser.error(problem)
    common = dict(dataset=args.dataset, steps=args.steps, seed=args.seed, eval_every=args.steps, logger="none",
                  progress=False)
    with tempfile.TemporaryDirectory() as folder:
        swept, swept_wall = timed_run(sweep=tuple(args.sweep), output_dir=Path(folder) / "sweep", **common)
        alone = [(setting, *timed_run(output_dir=Path(folder) / f"member{i}", **setting, **common))
                 for i, setting in enumerate(sweep_grid(args.sweep))]
    members = len(alone)
    seconds_per_update = sum(1 / summary["updates_per_second"] for _, summary, _ in alone)
    result = {
        "dataset": args.dataset, "steps": args.steps, "sweep": args.sweep, "members": members,
        "sweep_threads": swept["threads"], "run_threads": sorted({summary["threads"] for _, summary, _ in alone}),
        "torch": torch.__version__, "mode": swept["mode"],
        "precision": swept["precision"],
        "sweep_member_updates_per_second": members * swept["updates_per_second"],
        "sequential_member_updates_per_second": members / seconds_per_update,
        "sweep_wall_seconds": swept_wall, "sequential_wall_seconds": sum(wall for *_, wall in alone),
        "sweep_compilations": swept["compilations"],
        "runs": [{"setting": setting_label(setting), "updates_per_second": summary["updates_per_second"],
                  "wall_seconds": wall, "compilations": summary["compilations"]} for setting, summary, wall in alone],
    }
    result["speedup"] = result["sweep_member_updates_per_second"] / result["sequential_member_updates_per_second"]
    print(f"{members} members, {args.steps} updates each, {args.dataset}, {swept['mode']} {swept['precision']}; "
          f"threads: the sweep {result['sweep_threads']}, the runs {result['run_threads']} (each run's own choice)")
    print(f"  one sweep:           {result['sweep_member_updates_per_second']:8.1f} member-updates/s, "
          f"wall {swept_wall:.0f} s")
    print(f"  one run per member:  {result['sequential_member_updates_per_second']:8.1f} member-updates/s, "
          f"wall {result['sequential_wall_seconds']:.0f} s")
    print(f"  speed-up: {result['speedup']:.2f}x")
    compiled = [result["sweep_compilations"], *(run["compilations"] for run in result["runs"])]
    if any(count > 1 for count in compiled):  # a compilation after the first falls inside the timed updates
        print(f"  compiled more than once (the sweep, then each run): {compiled}: the rates hold that time")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
