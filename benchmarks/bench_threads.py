"""Two default runs started side by side, against one alone: updates/s of each, per thread setting.

    python benchmarks/bench_threads.py                     # default runs (10,000 updates each)
    python benchmarks/bench_threads.py --json benchmarks/results/results_threads.json
    python benchmarks/bench_threads.py --steps 50 --run-flags "--hidden-sizes 16 16 --eval-episodes 1"   # a smoke test

Each setting runs ``examples/iql_offline.py`` once alone, then twice at the same moment (two
processes, two run folders), and reads ``updates_per_second`` (training alone, evaluation excluded)
from each run's ``summary.json``. "kept" is a side-by-side run's rate over the solo rate: two runs
that share the machine fairly without losing to contention keep 50% each.

Settings (each names both OpenMP variables, so it means the same whatever the script sets by
default; libgomp reads ``GOMP_SPINCOUNT`` as how long an idle thread spins before it sleeps, and it
overrides ``OMP_WAIT_POLICY``'s own spin):

* ``default``: what ``examples/iql_offline.py`` does when the user sets nothing;
* ``passive``: idle threads sleep at once (``OMP_WAIT_POLICY=PASSIVE``, ``GOMP_SPINCOUNT=0``);
* ``active``: idle threads spin forever (``OMP_WAIT_POLICY=ACTIVE``, ``GOMP_SPINCOUNT=infinite``);
* ``spin N``: idle threads spin N rounds, then sleep (``OMP_WAIT_POLICY`` empty, ``GOMP_SPINCOUNT=N``);
* ``1 thread``: ``--threads 1`` with the default policy.

Run it on a machine with nothing else running; the dataset is built first, outside the timing.
Targets: a solo run at >= 95% of the ``active`` solo rate; each of two side-by-side runs >= 40% of
its solo rate.
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "default": ({}, []),
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"}, []),
    "active": ({"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "infinite"}, []),
    **{f"spin {n}": ({"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": str(n)}, []) for n in (1000, 2000, 3000, 5000, 10000, 30000, 100000)},
    "1 thread": ({}, ["--threads", "1"]),
    "2 threads": ({}, ["--threads", "2"]),
}


def start_run(folder: Path, steps: int, run_flags: list[str], env_overrides: dict, flags: list[str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")}
    env.update(env_overrides)
    command = [sys.executable, str(ROOT / "examples" / "iql_offline.py"), "--steps", str(steps), "--no-progress",
               "--logger", "none", "--output-dir", str(folder), *run_flags, *flags]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def rates(procs: list[tuple[subprocess.Popen, Path]], timeout: float | None = None) -> list[float] | None:
    """Each run's updates/s; None when they have not all finished within ``timeout`` s (they are killed)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    out = []
    for proc, folder in procs:
        try:
            _, err = proc.communicate(timeout=None if deadline is None else max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other, _ in procs:
                other.kill()
                other.communicate()
            return None
        if proc.returncode != 0:
            raise SystemExit(f"run in {folder} failed:\n{err[-2000:]}")
        out.append(json.loads((folder / "summary.json").read_text())["updates_per_second"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000, help="updates per run (default: the default run's 10000)")
    parser.add_argument("--run-flags", default="", help="extra flags for every run, e.g. '--hidden-sizes 16 16'")
    parser.add_argument("--settings", nargs="+", default=["default", "passive", "active", "1 thread"],
                        choices=list(SETTINGS))
    parser.add_argument("--no-pair", action="store_true", help="solo runs only")
    parser.add_argument("--pair-timeout", type=float, default=300.0,
                        help="seconds two side-by-side runs may take before they count as collapsed (default 300)")
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
            if args.no_pair:
                results.append({"setting": name, "solo": solo, "side_by_side": None, "kept": None})
                print(f"{name}: solo {solo:.1f} upd/s", file=sys.stderr)
                continue
            folders = [scratch / f"{name}-pair-{i}" for i in range(2)]
            pair = rates([(start_run(f, args.steps, run_flags, env_overrides, flags), f) for f in folders], args.pair_timeout)
            if pair is None:
                results.append({"setting": name, "solo": solo, "side_by_side": None, "kept": None,
                                "note": f"the two runs had not finished {args.steps} updates after {args.pair_timeout:.0f} s"})
                print(f"{name}: solo {solo:.1f} upd/s, side by side: collapsed", file=sys.stderr)
                continue
            results.append({"setting": name, "solo": solo, "side_by_side": pair, "kept": [r / solo for r in pair]})
            print(f"{name}: solo {solo:.1f} upd/s, side by side {pair[0]:.1f} and {pair[1]:.1f}", file=sys.stderr)

    print(f"\nTwo runs side by side vs one alone ({os.cpu_count()} CPUs, {args.steps} updates each)\n")
    print("| setting | solo upd/s | side by side upd/s | kept (each) | together vs solo |")
    print("|---|---|---|---|---|")
    for r in results:
        if r["side_by_side"] is None:
            print(f"| {r['setting']} | {r['solo']:.1f} | {r.get('note', '')} | | |")
            continue
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
