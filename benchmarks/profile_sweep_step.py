"""Where a vmapped step's time goes as its members grow: the compiled step of 1 and of K members, by kernel kind.

    python benchmarks/profile_sweep_step.py                          # 1 and 6 members, one thread, bf16
    python benchmarks/profile_sweep_step.py --members 1 6 --threads 2 --rounds 2 --json sweep_profile.json
    python benchmarks/profile_sweep_step.py --device cuda --precision fp32   # CUDA-graph steps, kernels' GPU time

Each row is one ``IQLUpdate`` (compile mode, the default job's shapes: obs 3, action 1, 2×256 networks,
batch 256 a member, indices into 20,000 transitions), profiled with inductor's per-kernel records over
``--updates`` updates: the GEMMs (torch's mm/bmm/addmm), the kernels that hold Adam's update (the graph's
fused kernels, into which inductor also fuses the gradients' last sums and casts; or torch's fused Adam kernel,
which a step of three or more members in bf16 calls), the other fused kernels, and the rest of the
update (the graph's launcher and whatever is not recorded). Beside them, Adam alone over the same
parameters: torch's fused kernel (eager) and its capturable foreach form compiled by itself. Member-updates/s
is timed without the profiler running, over as many updates just before. Run it alone on the host; the rounds
alternate the member counts. ``--device cuda`` runs the steps as CUDA graphs (the job's default there;
``--mode compile``: compiled only) and splits each update's GPU time by kernel (GEMMs: cuBLAS/CUTLASS kernels;
Adam: the foreach kernels); ``--top N`` lists the N kernels that took the most time in the largest member
count's step. On the CPU it ends with the most the largest member count could gain over one member's runs on
this host: that many one-member updates against the two parts of its own update no fusion removes, its GEMMs and
torch's fused Adam over its parameters.
"""
from __future__ import annotations

import argparse
import collections
import json
import time
import warnings
from pathlib import Path

import torch
import torch._inductor.config as inductor_config
from torch.optim.adam import adam
from torch.profiler import ProfilerActivity, profile

from host import cpu_name
from update_steps import Setup, make_batch, sync
from iql_torchrl import IQLLoss, IQLUpdate, make_iql_networks
from iql_torchrl.objectives.ensemble import SeedEnsemble

warnings.filterwarnings("ignore")
OBS, ACT, HIDDEN, BATCH, TRANSITIONS = 3, 1, (256, 256), 256, 20_000
KINDS = ("GEMMs", "kernels with Adam", "other fused kernels", "rest")


def kind(name: str) -> str | None:
    """A CPU kernel's kind (inductor's per-kernel records), or ``None`` for what is not a kernel."""
    if name.startswith("aoti_torch_cpu_") and "mm" in name:
        return "GEMMs"
    if "foreach_addcdiv" in name or "fused_adam" in name:  # the foreach form's kernels, or torch's fused kernel
        return "kernels with Adam"
    if name.startswith("graph_") and "cpp_fused" in name:
        return "other fused kernels"
    return None


def cuda_kind(name: str) -> str:
    """A CUDA kernel's kind by its name."""
    lowered = name.lower()
    if any(k in lowered for k in ("gemm", "cutlass", "cublas", "sm90_", "sm80_", "splitk")):
        return "GEMMs"
    if "foreach" in lowered or "fused_adam" in lowered:
        return "kernels with Adam"
    return "other fused kernels"


def make_update(members: int, precision: str, device: str = "cpu", mode: str = "compile") -> IQLUpdate:
    def loss(seed):
        torch.manual_seed(seed)
        return IQLLoss(*make_iql_networks(OBS, ACT, hidden_sizes=HIDDEN))

    ensemble = loss(0) if members == 1 else SeedEnsemble([loss(seed) for seed in range(members)])
    data = make_batch(Setup(batch_size=TRANSITIONS, obs_dim=OBS, action_dim=ACT, device=device))
    return IQLUpdate(ensemble.to(device), mode=mode, precision=precision, data=data, total_steps=10**6,
                     eager_checks=0)


def profile_step(update: IQLUpdate, members: int, updates: int, device: str = "cpu", top: int = 0) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    shape = (members, BATCH) if members > 1 else (BATCH,)
    draw = lambda: torch.randint(0, TRANSITIONS, shape, generator=g, device=device)
    for _ in range(30):
        update(draw())
    sync(device)
    start = time.perf_counter()
    for _ in range(updates):
        update(draw())
    sync(device)
    unprofiled = (time.perf_counter() - start) * 1e3 / updates
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as recorded:
        start = time.perf_counter()
        for _ in range(updates):
            update(draw())
        sync(device)
        ms = (time.perf_counter() - start) * 1e3 / updates
    split, kernels = collections.Counter(), collections.Counter()
    for event in recorded.key_averages():
        if device == "cuda":
            if event.self_device_time_total > 0 and event.device_type == torch.autograd.DeviceType.CUDA:
                kernels[event.key] += event.self_device_time_total / 1e3 / updates
                split[cuda_kind(event.key)] += event.self_device_time_total / 1e3 / updates
        elif (k := kind(event.key)) is not None:
            kernels[event.key] += event.self_cpu_time_total / 1e3 / updates
            split[k] += event.self_cpu_time_total / 1e3 / updates
    split["rest"] = ms - sum(split.values())
    row = {"ms": ms, "ms_unprofiled": unprofiled, **{k: split[k] for k in KINDS}}
    if top:
        row["top_kernels"] = [[name, ms_] for name, ms_ in kernels.most_common(top)]
    if hasattr(update.runner.guarded, "captures"):  # a CUDA graph: captured once, replayed since
        row["captures"] = update.runner.guarded.captures
    return row


def adam_alone(update: IQLUpdate, repeats: int = 200, device: str = "cpu") -> dict:
    """Milliseconds of one Adam step over the update's trainable parameters: torch's fused kernel, eager, and its
    capturable foreach form compiled alone."""
    params = [p.detach().clone() for group in update.params.values() for p in group]
    grads = [torch.randn_like(p) for p in params]
    avg, avg_sq = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    steps, lr = [torch.zeros((), device=device) for _ in params], torch.tensor(3e-4, device=device)
    settings = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False)
    fused = lambda: adam(params, grads, avg, avg_sq, [], steps, fused=True, lr=3e-4, **settings)
    foreach = torch.compile(lambda: adam(params, grads, avg, avg_sq, [], steps, foreach=True, capturable=True, lr=lr,
                                         **settings), fullgraph=True)
    out = {}
    for name, step in (("fused, eager", fused), ("foreach capturable, compiled alone", foreach)):
        for _ in range(20):
            step()
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        sync(device)
        out[name] = (time.perf_counter() - start) * 1e3 / repeats
    return {"parameters": sum(p.numel() for p in params), **out}


def ceiling(rows: list[dict], adam_rows: dict) -> dict:
    """The most K stacked members could gain over K one-member runs: K × one member's update (unprofiled) against
    the K-member step's GEMMs and torch's fused Adam alone over its parameters, the fastest of each."""
    k = max(adam_rows)
    one = min(row["ms_unprofiled"] for row in rows if row["members"] == 1)
    gemms = min(row["GEMMs"] for row in rows if row["members"] == k)
    fused_adam = adam_rows[k]["fused, eager"]
    return {"members": k, "one_member_ms": one, "gemms_ms": gemms, "fused_adam_ms": fused_adam,
            "speedup_at_most": k * one / (gemms + fused_adam)}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, nargs="+", default=[1, 6])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--updates", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--mode", default=None, choices=["compile", "cudagraphs"],
                        help="how the step runs (default: cudagraphs on CUDA, compile on the CPU)")
    parser.add_argument("--top", type=int, default=0, help="list the N kernels that took most of the largest step")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    inductor_config.cpp.enable_kernel_profile = True  # per-kernel records; set before the steps compile
    mode = args.mode or ("cudagraphs" if args.device == "cuda" else "compile")
    updates = {k: make_update(k, args.precision, args.device, mode) for k in args.members}
    rows = []
    for round_ in range(args.rounds):
        for members, update in updates.items():
            top = args.top if members == max(args.members) and round_ == args.rounds - 1 else 0
            row = {"members": members, "round": round_ + 1,
                   **profile_step(update, members, args.updates, args.device, top)}
            row["member_updates_per_second"] = members * 1e3 / row["ms_unprofiled"]
            rows.append(row)
    adam_rows = {k: adam_alone(update, device=args.device) for k, update in updates.items()}
    host = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    print(f"{host}, torch {torch.__version__}, {args.device}, {args.threads} thread(s), {args.precision}, "
          f"{args.updates} updates a row, {mode}" + (" (kernels' GPU time)" if args.device == "cuda" else ""))
    print(f"| members | round | ms an update (profiled) | member-updates/s (unprofiled) | {' | '.join(KINDS)} |")
    print("|---|---|---|---|" + "---|" * len(KINDS))
    for row in rows:
        print(f"| {row['members']} | {row['round']} | {row['ms']:.2f} | {row['member_updates_per_second']:.0f} | "
              + " | ".join(f"{row[k]:.2f}" for k in KINDS) + " |"
              + (f" captures {row['captures']}" if "captures" in row else ""))
    for row in rows:
        if row.get("top_kernels"):
            print(f"\nThe {len(row['top_kernels'])} kernels that took most of the {row['members']}-member step "
                  "(ms an update):")
            for name, ms in row["top_kernels"]:
                print(f"  {ms:8.4f}  {name[:150]}")
    print("\nAdam alone over the same parameters (ms a step):")
    for members, row in adam_rows.items():
        print(f"  {members} member(s), {row['parameters']:,} parameters: "
              + ", ".join(f"{name} {ms:.2f}" for name, ms in row.items() if name != "parameters"))
    bound = None
    if args.device == "cpu" and 1 in updates and len(updates) > 1:
        bound = ceiling(rows, adam_rows)
        print(f"\nAt most {bound['speedup_at_most']:.2f}x for {bound['members']} members on this host: "
              f"{bound['members']} one-member updates take {bound['members'] * bound['one_member_ms']:.2f} ms, "
              f"the {bound['members']}-member step's GEMMs alone {bound['gemms_ms']:.2f} ms and torch's fused Adam "
              f"alone {bound['fused_adam_ms']:.2f} ms")
    result = {"host": host, "device": args.device, "mode": mode, "torch": torch.__version__, "threads": args.threads,
              "precision": args.precision,
              "rows": rows, "adam_alone": {str(k): v for k, v in adam_rows.items()}, "ceiling": bound}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return rows


if __name__ == "__main__":
    main()
