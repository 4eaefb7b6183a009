"""Two default runs started side by side, against one alone: updates/s of each, per thread setting.

    python benchmarks/bench_threads.py                     # default runs (10,000 updates each)
    python benchmarks/bench_threads.py --json benchmarks/results_threads.json
    python benchmarks/bench_threads.py --steps 50 --run-flags "--hidden-sizes 16 16 --eval-episodes 1"   # a smoke test

Each setting runs ``examples/iql_offline.py`` once alone, then twice at the same moment (two
processes, two run folders), and reads ``updates_per_second`` (training alone, evaluation excluded)
from each run's ``summary.json``. "kept" is a side-by-side run's rate over the solo rate: two runs
that share the machine fairly without losing to contention keep 50% each.

Settings: ``auto`` is the default (``--threads auto``, idle OpenMP threads sleep:
``OMP_WAIT_POLICY=PASSIVE``); ``auto, spinning`` is the same thread count with OpenMP's own wait
policy (``OMP_WAIT_POLICY`` set empty: what the scripts did before); ``1 thread`` is ``--threads 1``.
Run it on a machine with nothing else running; the dataset is built first, outside the timing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "auto": ({}, []),
    "auto, spinning": ({"OMP_WAIT_POLICY": ""}, []),
    "1 thread": ({}, ["--threads", "1"]),
}


def start_run(folder: Path, steps: int, run_flags: list[str], env_overrides: dict, flags: list[str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")}
    env.update(env_overrides)
    command = [sys.executable, str(ROOT / "examples" / "iql_offline.py"), "--steps", str(steps), "--no-progress",
               "--logger", "none", "--output-dir", str(folder), *run_flags, *flags]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def rates(procs: list[tuple[subprocess.Popen, Path]]) -> list[float]:
    out = []
    for proc, folder in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"run in {folder} failed:\n{err[-2000:]}")
        out.append(json.loads((folder / "summary.json").read_text())["updates_per_second"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000, help="updates per run (default: the default run's 10000)")
    parser.add_argument("--run-flags", default="", help="extra flags for every run, e.g. '--hidden-sizes 16 16'")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    run_flags = shlex.split(args.run_flags)

    results = []
    with tempfile.TemporaryDirectory(prefix="bench-threads-") as scratch:
        scratch = Path(scratch)
        rates([(start_run(scratch / "warm-up", 1, run_flags + ["--eval-episodes", "1"], {}, []), scratch / "warm-up")])  # builds the dataset
        for name in args.settings:
            env_overrides, flags = SETTINGS[name]
            solo = rates([(start_run(scratch / f"{name}-solo", args.steps, run_flags, env_overrides, flags), scratch / f"{name}-solo")])[0]
            folders = [scratch / f"{name}-pair-{i}" for i in range(2)]
            pair = rates([(start_run(f, args.steps, run_flags, env_overrides, flags), f) for f in folders])
            results.append({"setting": name, "solo": solo, "side_by_side": pair, "kept": [r / solo for r in pair]})
            print(f"{name}: solo {solo:.1f} upd/s, side by side {pair[0]:.1f} and {pair[1]:.1f}", file=sys.stderr)

    print(f"\nTwo runs side by side vs one alone ({os.cpu_count()} CPUs, {args.steps} updates each)\n")
    print("| setting | solo upd/s | side by side upd/s | kept (each) | together vs solo |")
    print("|---|---|---|---|---|")
    for r in results:
        a, b = r["side_by_side"]
        print(f"| {r['setting']} | {r['solo']:.1f} | {a:.1f}, {b:.1f} | {r['kept'][0]:.0%}, {r['kept'][1]:.0%} | "
              f"{(a + b) / r['solo']:.2f}× |")
    if args.json:
        args.json.write_text(json.dumps({
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "steps": args.steps, "run_flags": run_flags, "results": results,
        }, indent=2))


if __name__ == "__main__":
    main()
