"""Updates per second of the IQL update step: TorchRL's IQLLoss step, IQLUpdate, and the GEMM limit.

One update = losses, gradients, Adam steps, soft target update, on a batch already sampled. In one
process, at one thread count, every variant is timed in the same rounds (round-robin, a block of
updates each, the order rotating every round); the table shows each variant's median block:

* ``torchrl-eager`` / ``torchrl-compile``: ``torchrl.objectives.IQLLoss`` updated as TorchRL's
  ``sota-implementations/iql`` script does (summed losses, ``backward()``, Adam, ``SoftUpdate``;
  compiled as that script compiles it); on CUDA also ``torchrl-cudagraphs``, the script's
  ``compile.cudagraphs`` path (compiled, then replayed by tensordict's ``CudaGraphModule``);
* ``ours-{eager,compile}-{paper,summed}``: ``IQLUpdate`` in each mode and update order;
* with ``--bf16``, the paper-order step with bf16 GEMMs, per layer choice: ``-bf16`` the hidden layers
  (``precision="bf16"``, eager and compiled), ``-bf16in`` also the input layers, ``-bf16all`` every layer;
* ``gemm-limit``: the GEMMs of one paper-order ``IQLUpdate`` step alone (recorded from the step,
  forward and backward), back to back: "% of GEMM limit" is that time over the row's time.

Same networks (``make_iql_networks``, same seed) and the paper's hyperparameters for every row.
Compiled rows also report the first call's wall time ("compile s"; "+ s" when the warm-up calls
after it compiled again) and the number of graphs ``torch._dynamo.explain`` finds in the
uncompiled step (ours: ``IQLUpdate.step_function``). ``--threads`` sets torch's threads for
every row, the GEMM limit included.

    python benchmarks/bench_update.py --threads 2        # writes benchmarks/results/results_update_2t.json
    python benchmarks/bench_update.py --threads 1 --profile ours-compile-paper   # + results/profile_ours-compile-paper_1t.txt
    python benchmarks/bench_update.py --threads 2 --variants ours-compile-paper --profile ours-compile-paper --kernels
    python benchmarks/bench_update.py --quick            # a tiny smoke run (no JSON unless --json)

A run with ``--variants`` writes JSON only where ``--json`` says: the default results files hold
the full default table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import iql_torchrl
from iql_torchrl.runs.threads import available_cpus
from iql_torchrl.precision_choice import MIN_FEATURES
from host import cpu_name
from update_steps import Setup, gemm_flops, gemm_steps, iql_steps, make_batch, recorded_gemms, sync, torchrl_steps

HERE = Path(__file__).resolve().parent
ORDERS = ("paper", "summed")
BASE_VARIANTS = ("torchrl-eager", "torchrl-compile", *(f"ours-{m}-{o}" for m in ("eager", "compile") for o in ORDERS),
                 "gemm-limit")
# bf16 GEMMs for the layers at least this wide in both dims: the hidden layers (--precision bf16), also the input
# layers (obs + act features), every layer (bf16 autocast's choice)
BF16_LAYERS = {"bf16": MIN_FEATURES, "bf16in": 16, "bf16all": 1}
BF16_VARIANTS = ("ours-eager-paper-bf16", *(f"ours-compile-paper-{layers}" for layers in BF16_LAYERS))
# TorchRL's CUDA-graph row last: tensordict's CudaGraphModule takes TensorDict out of torch's pytree registry for the
# whole process when it captures, so it is built and warmed up after every step of ours has compiled and captured
CUDA_VARIANTS = (*(f"ours-cudagraphs-{o}" for o in ORDERS), "torchrl-cudagraphs")
CUDA_BF16_VARIANTS = ("ours-cudagraphs-paper-bf16",)
ALL_VARIANTS = BASE_VARIANTS + BF16_VARIANTS + CUDA_VARIANTS + CUDA_BF16_VARIANTS
WARMUP_CALLS = 12  # after the first call; CUDA-graph capture happens after 10


# ------------------------------------------------------------------------------------- building
@dataclass
class Variant:
    name: str
    step: Callable
    plain: Callable | None  # the uncompiled step of a compiled variant


def build(name: str, setup: Setup, gemms) -> Variant:
    if name == "gemm-limit":
        steps = gemm_steps(setup, gemms)
    elif name.startswith("torchrl-"):
        steps = torchrl_steps(setup, name.split("-")[1])
    else:
        _, mode, order, *layers = name.split("-")
        steps = iql_steps(setup, mode, order, BF16_LAYERS[layers[0]] if layers else None)
    return Variant(name, steps.step, steps.plain)


# ------------------------------------------------------------------------------------- timing
def time_block(step, batch, n: int, device) -> float:
    """Milliseconds per update over ``n`` consecutive updates."""
    sync(device)
    start = time.perf_counter()
    for _ in range(n):
        step(batch)
    sync(device)
    return (time.perf_counter() - start) * 1000 / n


def warm_up(variant: Variant, batch, device) -> dict:
    """Wall seconds of the first call (where compilation happens) and of the warm-up calls after
    it, and how many graphs dynamo compiled in each (warm-up graphs are recompilations)."""
    graphs = torch._dynamo.utils.counters["stats"]
    sync(device)
    start, before = time.perf_counter(), graphs["unique_graphs"]
    variant.step(batch)
    sync(device)
    first, first_graphs = time.perf_counter() - start, graphs["unique_graphs"] - before
    start, before = time.perf_counter(), graphs["unique_graphs"]
    for _ in range(WARMUP_CALLS):
        variant.step(batch)
    sync(device)
    return {"first_call_s": first, "first_call_graphs": first_graphs,
            "warmup_s": time.perf_counter() - start, "warmup_graphs": graphs["unique_graphs"] - before}


def interleaved(variants, batches, rounds: int, block: int, device) -> dict[str, list[float]]:
    """ms/update of each variant per round; each round times every variant once, order rotated."""
    samples = {v.name: [] for v in variants}
    for r in range(rounds):
        shift = r % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            samples[variant.name].append(time_block(variant.step, batches[variant.name], block, device))
    return samples


def graph_count(variant: Variant, batch) -> dict:
    """Graphs and graph breaks ``torch._dynamo.explain`` finds in the uncompiled step.

    ``explain`` resets dynamo (every compiled step's cache): call it after all timing.
    """
    explanation = torch._dynamo.explain(variant.plain)(batch)
    return {
        "graphs": explanation.graph_count,
        "graph_breaks": explanation.graph_break_count,
        "break_reasons": sorted({str(b.reason).splitlines()[0] for b in explanation.break_reasons}),
    }


def write_profile(variant: Variant, batch, device, updates: int, path: Path, header: str) -> None:
    """torch.profiler's top ops by self CPU time over ``updates`` updates, as a text table."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if str(device).startswith("cuda") else [])
    with profile(activities=activities) as prof:
        for _ in range(updates):
            variant.step(batch)
        sync(device)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    path.write_text(f"{header}\n{updates} updates profiled, top ops by self CPU time\n\n{table}\n")


def profile_each_kernel() -> None:
    """Steps compiled from here on record each of their kernels in torch.profiler: inductor's kernel profile, with
    the graph's kernels called from Python (the C++ launcher hides them from the profiler)."""
    import torch._inductor.config as inductor_config

    from iql_torchrl.step import modes

    inductor_config.cpp.enable_kernel_profile = True
    options = modes.inductor_options
    modes.inductor_options = lambda *args: {**options(*args), "cpp_wrapper": False}


# ------------------------------------------------------------------------------------- report
def rows_from(samples, warm, graphs) -> dict[str, dict]:
    rows = {}
    for name, ms in samples.items():
        median = statistics.median(ms)
        compiled = name in graphs
        rows[name] = {
            "variant": name,
            "updates_per_s": 1000 / median,
            "ms_per_update": median,
            "min_ms": min(ms),
            "max_ms": max(ms),
            "samples_ms": ms,
            "compile_s": warm[name]["first_call_s"] if compiled else None,
            **warm[name],
            **graphs.get(name, {}),
        }
    return rows


def targets(rows: dict, threads: int) -> list[dict]:
    """The issue's targets for each update order, from the rows present."""
    speed = {name: row["updates_per_s"] for name, row in rows.items()}
    vs_torchrl_compiled = 1.5 if threads == 1 else 1.7
    wanted = []
    for order in ORDERS:
        eager, compiled = f"ours-eager-{order}", f"ours-compile-{order}"
        wanted += [
            (f"{order}: compiled / TorchRL compiled", compiled, "torchrl-compile", vs_torchrl_compiled),
            (f"{order}: compiled / our eager", compiled, eager, 1.5),
            (f"{order}: eager / TorchRL eager", eager, "torchrl-eager", 1.3),
            (f"{order}: compiled / GEMM limit", compiled, "gemm-limit", 0.60),
        ]
    wanted.append(("bf16 compiled / fp32 compiled", "ours-compile-paper-bf16", "ours-compile-paper", 1.4))
    out = []
    for label, ours, base, target in wanted:
        if ours not in speed or base not in speed:
            continue
        measured = speed[ours] / speed[base]
        out.append({"target": label, "measured": measured, "goal": target, "met": measured >= target,
                    "speedup_needed": max(target / measured, 1.0)})
    return out


def print_table(rows: dict, title: str) -> None:
    speed = {name: row["updates_per_s"] for name, row in rows.items()}
    limit = speed.get("gemm-limit")

    def ratio(name, base):
        return f"{speed[name] / speed[base]:.2f}x" if base in speed and name != "gemm-limit" else "-"

    print(f"\n{title}\n")
    print("| variant | upd/s | ms/update (min-max) | x TorchRL compiled | x TorchRL eager | % of GEMM limit | graphs | compile s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        graphs = f"{r['graphs']} ({r['graph_breaks']} breaks)" if "graphs" in r else "-"
        compile_s = "-"
        if r["compile_s"] is not None:
            compile_s = f"{r['compile_s']:.1f}"
            if r["warmup_graphs"]:
                compile_s += f" + {r['warmup_s']:.1f} ({r['warmup_graphs']} recompiled)"
        of_limit = f"{speed[name] / limit:.0%}" if limit else "-"
        print(f"| {name} | {r['updates_per_s']:.1f} | {r['ms_per_update']:.2f} ({r['min_ms']:.2f}-{r['max_ms']:.2f}) | "
              f"{ratio(name, 'torchrl-compile')} | {ratio(name, 'torchrl-eager')} | {of_limit} | {graphs} | {compile_s} |")


def print_targets(results: list[dict]) -> None:
    print("\n| target | measured | goal | met | gap |")
    print("|---|---|---|---|---|")
    for t in results:
        percent = "limit" in t["target"]
        shown = (lambda x: f"{x:.0%}") if percent else (lambda x: f"{x:.2f}x")
        if t["met"]:
            gap = f"+{(t['measured'] - t['goal']) * 100:.0f} points" if percent else f"+{t['measured'] - t['goal']:.2f}x"
        else:
            short = f"{(t['goal'] - t['measured']) * 100:.0f} points" if percent else f"{t['goal'] - t['measured']:.2f}x"
            gap = f"short by {short}: needs {t['speedup_needed']:.2f}x faster"
        print(f"| {t['target']} | {shown(t['measured'])} | {shown(t['goal'])} | {'PASS' if t['met'] else 'MISS'} | {gap} |")


# ------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the CPUs this process may use)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (each times every variant once)")
    parser.add_argument("--block", type=int, default=50, help="updates per timed block")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--obs-dim", type=int, default=17)
    parser.add_argument("--action-dim", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=256, help="width of every hidden layer")
    parser.add_argument("--layers", type=int, default=2, help="hidden layers per network")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", nargs="+", default=None, metavar="VARIANT",
                        help=f"which rows (default: all that apply): {', '.join(ALL_VARIANTS)}")
    parser.add_argument("--bf16", action="store_true",
                        help="also our paper-order step with bf16 GEMMs: hidden layers (eager and compiled), + input layers, every layer")
    parser.add_argument("--matmul-precision", default="highest", choices=("highest", "high", "medium"),
                        help="torch.set_float32_matmul_precision for every row ('high': TF32 on NVIDIA GPUs)")
    parser.add_argument("--profile", default=None, metavar="VARIANT", help="write a torch.profiler table of this variant")
    parser.add_argument("--profile-out", type=Path, default=None,
                        help="profile table path (default: benchmarks/results/profile_<variant>_<threads>t.txt)")
    parser.add_argument("--kernels", action="store_true",
                        help="with --profile, CPU: one row per kernel of the compiled graph (inductor's kernel profile, "
                             "the graph's launcher in Python); every compiled row is then built so")
    parser.add_argument("--json", type=Path, default=None,
                        help="results path (default: benchmarks/results/results_update_<threads>t.json for the full default run; "
                             "none with --quick or --variants unless given)")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run: B 32, width 32, 2 rounds of 3 updates")
    args = parser.parse_args(argv)
    for flag in ("threads", "rounds", "block", "batch_size", "obs_dim", "action_dim", "hidden", "layers"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {value}.")
    cuda = str(args.device).startswith("cuda")
    if cuda and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here; use --device cpu.")
    default = (BASE_VARIANTS + (BF16_VARIANTS if args.bf16 else ()) + (CUDA_VARIANTS if cuda else ())
               + (CUDA_BF16_VARIANTS if cuda and args.bf16 else ()))
    args.variants = sorted(dict.fromkeys(args.variants or default), key=lambda name: name == "torchrl-cudagraphs")
    for name in args.variants:
        if name not in ALL_VARIANTS:
            parser.error(f"--variants: unknown variant {name!r}; choose from {', '.join(ALL_VARIANTS)}.")
        if name in CUDA_VARIANTS + CUDA_BF16_VARIANTS and not cuda:
            parser.error(f"--variants {name} needs CUDA (--device cuda).")
    if args.profile is not None and args.profile not in args.variants:
        parser.error(f"--profile {args.profile!r} is not among the variants run: {', '.join(args.variants)}.")
    if args.kernels and (args.profile is None or cuda):
        parser.error("--kernels profiles a compiled CPU step's kernels: give --profile VARIANT, on --device cpu.")
    if args.quick:
        args.rounds, args.block, args.batch_size, args.hidden = 2, 3, 32, 32
    return args


def main(argv=None):
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads or available_cpus())
    torch.set_float32_matmul_precision(args.matmul_precision)
    threads = torch.get_num_threads()
    setup = Setup(args.batch_size, args.obs_dim, args.action_dim, args.hidden, args.layers, args.device)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({cpu_name()})"
    title = (f"IQL update step, B {setup.batch_size}, obs {setup.obs_dim}, act {setup.action_dim}, "
             f"{setup.layers}x{setup.hidden} MLPs, {device_name}, {threads} threads"
             + ("" if args.matmul_precision == "highest" else f", float32 matmul precision {args.matmul_precision}"))
    print(title, file=sys.stderr)

    if args.kernels:
        profile_each_kernel()
    gemms = recorded_gemms(setup)
    variants = [build(name, setup, gemms) for name in args.variants]
    batches = {v.name: make_batch(setup) for v in variants}  # one each: a step may write into its batch
    warm = {}
    for v in variants:
        warm[v.name] = warm_up(v, batches[v.name], args.device)
        w = warm[v.name]
        print(f"  {v.name}: first call {w['first_call_s']:.1f} s, {WARMUP_CALLS} more {w['warmup_s']:.1f} s "
              f"({w['first_call_graphs']} + {w['warmup_graphs']} graphs compiled)", file=sys.stderr)
    samples = interleaved(variants, batches, args.rounds, args.block, args.device)

    if args.profile:
        variant = next(v for v in variants if v.name == args.profile)
        path = args.profile_out or HERE / "results" / f"profile_{args.profile}_{threads}t.txt"
        median = statistics.median(samples[variant.name])
        write_profile(variant, batches[variant.name], args.device, min(args.block, 20), path,
                      f"{variant.name}: {median:.2f} ms/update (median of the timed rounds); {title}")
        print(f"  profile of {variant.name} written to {path}", file=sys.stderr)
    # last: explain resets every compiled step's cache
    graphs = {v.name: graph_count(v, batches[v.name]) for v in variants if v.plain is not None}

    rows = rows_from(samples, warm, graphs)
    flops = gemm_flops(gemms)
    print_table(rows, title)
    if "gemm-limit" in rows:
        limit_ms = rows["gemm-limit"]["ms_per_update"]
        print(f"\nGEMM limit: the {len(gemms)} GEMMs of one paper-order step (forward and backward), back to back: "
              f"{limit_ms:.2f} ms = {1000 / limit_ms:.0f} upd/s; {flops / 1e9:.3f} GFLOP/update "
              f"({flops / limit_ms / 1e6:.0f} GFLOP/s)")
    for name, r in rows.items():
        for reason in r.get("break_reasons", []):
            print(f"graph break in {name}: {reason}")
    met = targets(rows, threads)
    if met:
        print_targets(met)

    result = {
        "device": device_name,
        "threads": threads,
        "matmul_precision": args.matmul_precision,
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")},
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchrl": _version("torchrl"),
        "tensordict": _version("tensordict"),
        "iql_torchrl": iql_torchrl.__version__,
        "setup": vars(setup),
        "rounds": args.rounds,
        "block": args.block,
        "rows": list(rows.values()),
        "gemm_count": len(gemms),
        "gemm_flops_per_update": flops,
        "targets": met,
    }
    # the default results file holds the full table: a partial or tiny run writes only where --json says
    partial = args.quick or args.variants is not None
    path = args.json or (None if partial else HERE / "results" / f"results_update_{threads}t.json")
    if path is not None:
        Path(path).write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwritten to {path}", file=sys.stderr)
    return result


def _version(package: str) -> str:
    return __import__(package).__version__


if __name__ == "__main__":
    main()
