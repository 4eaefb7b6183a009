"""How much Python dynamo traces to compile the update step: source lines by file, and the trace's seconds.

Every compilation of the step (a cold run's first update, a warm run's too: torch's caches keep the kernels, not
the trace, and the test tiers' ~50 compiled steps) starts with dynamo running the step's Python symbolically, one
source line at a time. The step at the main job's default shapes (obs 3, action 1, batch 256, 2×256 networks,
indices into the data) compiles in a child process with ``TORCH_LOGS=trace_source``; its traced lines are counted
by file, and by the package's own line they follow (what a change to that line would save). Line counts do not
depend on the host; the seconds (``torch._dynamo.utils.compile_times``, from a second child without the logging,
which slows tracing) do.

    python benchmarks/bench_trace.py --json benchmarks/results/results_trace.json
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = f"""
import json, sys
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
import torch
from torch._dynamo.utils import compile_times
from update_steps import Setup, make_batch, make_iql_update
setup = Setup(obs_dim=3, action_dim=1)
data = make_batch(Setup(batch_size=100_000, obs_dim=3, action_dim=1))
update = make_iql_update(setup, "compile", "paper", "fp32", data=data)
update(torch.randint(100_000, (256,)))
names, values = compile_times(repr="csv", aggregate=True)
seconds = {{name: float(value) for name, value in zip(names, values)
            if name in ("bytecode_tracing", "_compile.compile_inner")}}
print("SECONDS " + json.dumps(seconds))
"""
LINE = re.compile(r"TRACE starts_line (\S+):(\d+)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="where to write the counts")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    done = _compile_once({"TORCH_LOGS": "trace_source"})
    by_file, by_own_line, own = collections.Counter(), collections.Counter(), "(before the step's own lines)"
    for match in map(LINE.search, done.stderr.splitlines()):
        if match is None:
            continue
        path = match.group(1).split("site-packages/")[-1]
        if "iql_torchrl/" in path:
            path = "iql_torchrl/" + path.split("iql_torchrl/")[-1]
            own = f"{path}:{match.group(2)}"
        by_file[path] += 1
        by_own_line[own] += 1
    seconds = json.loads(_compile_once({}).stdout.split("SECONDS ")[-1])
    total = sum(by_file.values())
    print(f"traced source lines: {total:,}; bytecode tracing {seconds.get('bytecode_tracing', 0):.2f} s of "
          f"{seconds.get('_compile.compile_inner', 0):.2f} s compiling")
    for title, counts in (("file", by_file), ("after the package's line", by_own_line)):
        print(f"\n| {title} | lines |\n|---|---|")
        for name, count in counts.most_common(args.top):
            print(f"| {name} | {count:,} |")
    if args.json:
        args.json.write_text(json.dumps({"lines": total, "seconds": seconds, "by_file": dict(by_file.most_common()),
                                         "by_own_line": dict(by_own_line.most_common())}, indent=1))


def _compile_once(env: dict) -> subprocess.CompletedProcess:
    """The child's run, on an inductor cache of its own (a cold compilation)."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, **env, "TORCHINDUCTOR_CACHE_DIR": cache}
        done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=900)
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    return done


if __name__ == "__main__":
    main()
