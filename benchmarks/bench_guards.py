"""Updates per second of the compiled step as ``IQLUpdate`` builds it against guarded ``torch.compile`` steps.

The compiled ``IQLUpdate`` step evaluates dynamo's guards only on a call that meets a new variant (a call
signature, or a Python value its trace read that changed: ``iql_torchrl.step.baked``); the other calls skip
them (``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``). A plain guarded ``torch.compile`` step
evaluates them on every call; PyTorch's public guard filters drop some of them. Rows, each the same paper-order
step at the main job's default shapes (obs 3, action 1, batch 256, 2×256 networks, indices into the data, as the
job calls it), timed in the same rounds (``bench_update.interleaved``; the median block):

* ``as-built``: ``IQLUpdate(mode="compile")`` as built;
* ``guarded``: the same step evaluating every guard dynamo writes on every call;
* ``guarded-nn-modules``: with PyTorch's ``torch.compiler.skip_guard_on_all_nn_modules_unsafe``;
* ``guarded-no-state-tensors``: without the guards on tensors reached from the step's ``self`` (parameters,
  optimizer state, counters: what ``IQLUpdate`` refuses to see replaced before each call), the others kept.

    python benchmarks/bench_guards.py --threads 1 --precision bf16 --json benchmarks/results/results_guards_1t.json
    python benchmarks/bench_guards.py --threads 2 --precision fp32 --json benchmarks/results/results_guards_2t_fp32.json

The warm start (first update of a second run) is the main job's: docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_update import Variant, interleaved, time_block  # noqa: E402
from host import cpu_name  # noqa: E402
from update_steps import Setup, make_batch, make_iql_update  # noqa: E402

from iql_torchrl.step.modes import StepRunner  # noqa: E402

SETUP = Setup(obs_dim=3, action_dim=1)  # the default dataset's (pendulum); batch 256, 2×256
DATA = 100_000  # transitions the indices draw from
STATE_GUARDS = ("TENSOR_MATCH", "ID_MATCH", "DATA_PTR_MATCH", "NO_TENSOR_ALIASING")
FILTERS = {
    "guarded": lambda entries: [True] * len(entries),
    "guarded-nn-modules": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
    "guarded-no-state-tensors": lambda entries: [
        not (e.guard_type in STATE_GUARDS and e.name.startswith("self")) for e in entries],
}


class GuardedRunner(StepRunner):
    """The step under a guarded ``torch.compile`` whose guards ``keep`` filters, evaluated on every call."""

    def __init__(self, step, keep):
        self.keep = keep
        super().__init__(step, mode="compile")

    def _record_guards(self, entries):
        entries = list(entries)
        super()._record_guards(entries)
        return self.keep(entries)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--block", type=int, default=300, help="updates per timed block")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    data = make_batch(Setup(batch_size=DATA, obs_dim=SETUP.obs_dim, action_dim=SETUP.action_dim))
    indices = torch.randint(DATA, (SETUP.batch_size,), generator=torch.Generator().manual_seed(1))
    updates = {}
    for name in ("as-built", *FILTERS):
        updates[name] = make_iql_update(SETUP, "compile", "paper", args.precision, data=data)
        if name in FILTERS:
            updates[name].runner = GuardedRunner(updates[name]._paper_step, FILTERS[name])
        time_block(updates[name], indices, 100, "cpu")  # compiles, then warms up
    variants = [Variant(name, update, None) for name, update in updates.items()]
    samples = interleaved(variants, {name: indices for name in updates}, args.rounds, args.block, "cpu")
    host = cpu_name()
    rows = {name: {"updates_per_second": 1000 / statistics.median(ms), "ms_per_update": ms,
                   "compilations": updates[name].compilations} for name, ms in samples.items()}
    best = rows["as-built"]["updates_per_second"]
    print(f"{host}; {args.threads} thread(s), {args.precision}, torch {torch.__version__}")
    print("| step | updates/s | as built / row |\n|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['updates_per_second']:.1f} | {best / row['updates_per_second']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"host": host, "threads": args.threads, "precision": args.precision,
                                         "torch": torch.__version__, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
