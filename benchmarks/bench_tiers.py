"""How long each test tier takes on this host, and as on a CPU without native bf16.

Runs one tier (README.md's command: ``pytest -q -n 2``, ``-m slow`` for the slow tier) in a subprocess from a cold
compiler cache of its own, with ``--durations=0``, and prints the wall time, the outcome, the time per test module
and the slowest tests; ``--json`` keeps them.

``--cpu no-native-bf16`` runs the tier as a CPU with AVX2 and no bf16 instructions would: torch's and inductor's
kernels for AVX2 (``ATEN_CPU_CAPABILITY=avx2``), oneDNN's and MKL's likewise (``ONEDNN_MAX_CPU_ISA``,
``MKL_ENABLE_INSTRUCTIONS``), and the package told that the CPU has no native bf16 (``--precision auto`` takes
fp32, the tests that train in bf16 move to the slow tier, as they do there). It emulates the instruction set,
not such a host's clock or caches: an AVX2-only host is slower in everything besides.

Each run gets its own inductor cache (``TORCHINDUCTOR_CACHE_DIR``): torch's FX graph cache does not key its code on
the vector instructions it was generated for, and code made for AVX-512 and compiled for AVX2 computes wrong
values (docs/performance.md).

    python benchmarks/bench_tiers.py --tier fast --cpu no-native-bf16 --json benchmarks/results/results_tiers_fast_no-native-bf16.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from host import cpu_name

ROOT = Path(__file__).resolve().parent.parent
NO_NATIVE_BF16 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
DURATION = re.compile(r"^\s*([0-9.]+)s (setup|call|teardown)\s+(\S.*?)\s*$")
OUTCOME = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected)")


def run_tier(tier: str, cpu: str, workers: int) -> dict:
    """Runs the tier and returns its wall time, outcome and per-test durations (setup + call + teardown)."""
    command = [sys.executable, "-m", "pytest", "-q", "-n", str(workers), "-p", "no:cacheprovider", "--durations=0",
               *(["-m", "slow"] if tier == "slow" else []), "tests"]
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        if cpu == "no-native-bf16":
            env.update(NO_NATIVE_BF16, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                                                 env.get("PYTHONPATH")])))
            command[3:3] = ["-p", "cpu_without_bf16"]
        start = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
    tests = defaultdict(float)
    for line in done.stdout.splitlines():
        if match := DURATION.match(line):
            tests[match.group(3)] += float(match.group(1))
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-2000:]
    outcome = {kind.rstrip("s") if kind.startswith("error") else kind: int(n) for n, kind in OUTCOME.findall(last)}
    return {"wall_s": wall, "returncode": done.returncode, "outcome": outcome, "summary": last,
            "tests": dict(sorted(tests.items(), key=lambda item: -item[1])),
            "failures": [line for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]}


def by_module(tests: dict) -> list[tuple[str, float, int]]:
    """(module, seconds, tests) per test module, slowest first."""
    modules = defaultdict(lambda: [0.0, 0])
    for name, seconds in tests.items():
        module = modules[name.split("::")[0]]
        module[0] += seconds
        module[1] += 1
    return sorted(((name, s, n) for name, (s, n) in modules.items()), key=lambda row: -row[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tier", choices=["fast", "slow"], default="fast")
    parser.add_argument("--cpu", choices=["native", "no-native-bf16"], default="native")
    parser.add_argument("--workers", type=int, default=2, help="pytest -n (README.md's command: 2)")
    parser.add_argument("--top", type=int, default=15, help="how many of the slowest tests to print")
    parser.add_argument("--json", type=Path, help="where to write the results")
    args = parser.parse_args()

    result = run_tier(args.tier, args.cpu, args.workers)
    host = cpu_name() + (" as a CPU without native bf16 (AVX2 kernels)" if args.cpu == "no-native-bf16" else "")
    print(f"{args.tier} tier, {host}, pytest -n {args.workers}, cold compiler cache")
    print(f"wall {result['wall_s']:.0f} s: {result['summary']}")
    for line in result["failures"]:
        print(f"  {line}")
    print("\n| module | tests timed (≥ 5 ms) | seconds (summed over workers) |\n|---|---|---|")
    for name, seconds, count in by_module(result["tests"]):
        print(f"| {name} | {count} | {seconds:.1f} |")
    print(f"\n| slowest {args.top} tests | seconds |\n|---|---|")
    for name, seconds in list(result["tests"].items())[:args.top]:
        print(f"| {name} | {seconds:.1f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"tier": args.tier, "cpu": args.cpu, "host": host, "workers": args.workers,
                                         **result}, indent=1))
    sys.exit(result["returncode"])


if __name__ == "__main__":
    main()
