"""The main job end to end against its own update step: where a run's speed goes.

    python benchmarks/bench_run.py                              # default flags (cold, warm), eager, --compile fp32 / bf16
    python benchmarks/bench_run.py --json benchmarks/results/results_run.json
    python benchmarks/bench_run.py --steps 200 --modes eager --step-rounds 2   # a smoke test

In one sitting, for each mode (the default flags with torch's compile caches empty, then again with
what the first run left in them; ``--no-compile``, and ``--compile`` at each ``--precision``, forced) it runs

* the step alone, as ``bench_update.py`` measures it (``ours-<eager|compile>-paper[-bf16]``: the step,
  precision and threads the job ran, from its console and ``summary.json``; the default dataset's shapes,
  interleaved blocks, the median block), in its own process;
* the main job, ``examples/iql_offline.py`` with the default dataset, ``--steps N --eval-every
  1000000 --eval-episodes 2 --logger none``: its training updates/s (``summary.json``: update time
  only) and the process's wall time (dataset built beforehand, outside the timing);

and states the run's overhead outside the step: 1 − job rate / step rate. Each process starts from
the environment this one was started with (no ``OMP_*`` variable added), so the job runs with the
thread policy its script sets and the step with the process defaults. Run it with nothing else
running on the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from host import cpu_name

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# mode -> flags; every run shares one fresh inductor cache folder, so "default, cache warm" finds what
# "default, cache cold" stored (the user's own cache folder is never touched)
MODES = {"default, cache cold": [], "default, cache warm": [], "eager": ["--no-compile"],
         "compile fp32": ["--compile", "--precision", "fp32"], "compile bf16": ["--compile", "--precision", "bf16"]}
STEP_VARIANT = {("eager", "fp32"): "ours-eager-paper", ("compile", "fp32"): "ours-compile-paper",
                ("eager", "bf16"): "ours-eager-paper-bf16", ("compile", "bf16"): "ours-compile-paper-bf16"}
DEFAULT_SHAPES = ["--obs-dim", "3", "--action-dim", "1"]  # iql_torchrl/pendulum/mixed-v0, the default dataset


def run_job(folder: Path, steps: int, flags: list[str], cache: Path) -> dict:
    command = [sys.executable, str(ROOT / "examples" / "iql_offline.py"), "--steps", str(steps), "--no-progress",
               "--logger", "none", "--eval-every", "1000000", "--eval-episodes", "2", "--output-dir", str(folder), *flags]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)})
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    summary = json.loads((folder / "summary.json").read_text())
    return {"updates_per_second": summary["updates_per_second"], "process_seconds": wall,
            "first_update_seconds": summary.get("compile_seconds"),
            "precision": summary["precision"], "threads": summary["threads"],
            "console": [line for line in done.stdout.splitlines() + done.stderr.splitlines()
                        if "compil" in line.lower() or "computes in" in line]}


def step_rate(variant: str, threads: int, rounds: int, block: int, scratch: Path) -> float:
    out = scratch / f"{variant}_{threads}t.json"
    command = [sys.executable, str(HERE / "bench_update.py"), "--variants", variant, *DEFAULT_SHAPES,
               "--threads", str(threads), "--rounds", str(rounds), "--block", str(block), "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())["rows"][0]["updates_per_s"]


def job_mode(flags: list[str], console: list[str]) -> str:
    """Which step the job ran: compiled when its console says it compiled the step."""
    if "--compile" in flags:
        return "compile"
    if "--no-compile" in flags:
        return "eager"
    return "compile" if any("runs compiled" in line for line in console) else "eager"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6000, help="updates of each job (default 6000)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--step-rounds", type=int, default=5, help="bench_update rounds of the step alone")
    parser.add_argument("--step-block", type=int, default=50, help="bench_update updates per block")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-run-") as scratch:
        scratch = Path(scratch)
        cache = scratch / "inductor"
        run_job(scratch / "warm-up", 1, ["--no-compile"], cache)  # builds the default dataset, outside the timing
        step_rates = {}
        for name in args.modes:
            job = run_job(scratch / name.replace(" ", "_").replace(",", ""), args.steps, MODES[name], cache)
            mode = job_mode(MODES[name], job["console"]), job["precision"], job["threads"]
            if mode not in step_rates:
                step_rates[mode] = step_rate(STEP_VARIANT[mode[:2]], mode[2], args.step_rounds, args.step_block, scratch)
            rate = step_rates[mode]
            rows.append({"mode": name, "step": mode[0], "precision": mode[1], "threads": mode[2],
                         "step_updates_per_second": rate,
                         "job_updates_per_second": job["updates_per_second"], "job_process_seconds": job["process_seconds"],
                         "first_update_seconds": job["first_update_seconds"],
                         "overhead_outside_step": 1 - job["updates_per_second"] / rate})
            print(f"{name}: step {rate:.1f} upd/s, job {job['updates_per_second']:.1f} upd/s, "
                  f"{job['process_seconds']:.1f} s", file=sys.stderr)

    print(f"\nThe main job vs its step ({os.cpu_count()} CPUs, {cpu_name()}, {args.steps} updates a job)\n")
    print("| flags | step run | precision | threads | step alone upd/s | job training upd/s | job / step | first update s "
          "| job wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        first = "–" if r["first_update_seconds"] is None else f"{r['first_update_seconds']:.1f}"
        print(f"| {r['mode']} | {r['step']} | {r['precision']} | {r['threads']} | {r['step_updates_per_second']:.1f} | {r['job_updates_per_second']:.1f} | "
              f"{1 - r['overhead_outside_step']:.0%} | {first} | {r['job_process_seconds']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "cpu": cpu_name()},
            "env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_", "KMP_"))},
            "steps": args.steps, "rows": rows,
        }, indent=2))


if __name__ == "__main__":
    main()
