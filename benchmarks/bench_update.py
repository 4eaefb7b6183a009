"""Updates per second of the full IQL update step: iql_torchrl vs TorchRL's IQLLoss vs the GEMM limit.

One step = losses, backward, Adam steps, soft target update, on a batch already sampled. Both
implementations get identical networks (``make_iql_networks``), identical optimizers (Adam 3e-4,
fused) and the same compile scope (the whole step). All in one process, repetitions interleaved,
medians with min/max, warm-up excluded, compile time reported apart.

The limit: every matrix multiplication of the step (forward and backward, its own shapes) timed in
isolation in the same run, summed: what an implementation with zero overhead would need here.

    python benchmarks/bench_update.py                       # default: B=256, obs 17, act 6, 2x256
    python benchmarks/bench_update.py --quick --json out.json
    python benchmarks/bench_update.py --scaling --png scaling.png
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from dataclasses import dataclass

import torch
from tensordict import TensorDict
from torchrl.objectives import IQLLoss as TorchRLIQLLoss
from torchrl.objectives import SoftUpdate

import iql_torchrl
from iql_torchrl import IQLLoss, IQLUpdate, make_iql_networks

warnings.filterwarnings("ignore")


@dataclass
class Setup:
    batch_size: int = 256
    obs_dim: int = 17
    action_dim: int = 6
    hidden: int = 256
    layers: int = 2
    device: str = "cpu"

    @property
    def hidden_sizes(self):
        return (self.hidden,) * self.layers


def make_batch(setup: Setup, seed: int = 0) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    b, o, a = setup.batch_size, setup.obs_dim, setup.action_dim
    return TensorDict(
        {
            "observation": torch.randn(b, o, generator=g),
            "action": torch.rand(b, a, generator=g) * 1.8 - 0.9,
            ("next", "observation"): torch.randn(b, o, generator=g),
            ("next", "reward"): torch.randn(b, 1, generator=g),
            ("next", "terminated"): torch.rand(b, 1, generator=g) < 0.01,
            ("next", "done"): torch.rand(b, 1, generator=g) < 0.01,
        },
        [b],
        device=setup.device,
    )


# ------------------------------------------------------------------------------------- the steps
def iql_torchrl_step(setup: Setup, mode: str, order: str, dtype: str = "float32"):
    torch.manual_seed(0)
    loss = IQLLoss(*make_iql_networks(setup.obs_dim, setup.action_dim, hidden_sizes=setup.hidden_sizes))
    loss = loss.to(setup.device)
    autocast = torch.bfloat16 if dtype == "bfloat16" else None
    return IQLUpdate(loss, total_steps=10**9, mode=mode, order=order, autocast_dtype=autocast)


def torchrl_step(setup: Setup, mode: str):
    """TorchRL's offline IQL script: one summed backward, three Adam optimizers, SoftUpdate."""
    torch.manual_seed(0)
    actor, critics, value = make_iql_networks(setup.obs_dim, setup.action_dim, hidden_sizes=setup.hidden_sizes)
    loss = TorchRLIQLLoss(actor, critics, value, temperature=3.0, expectile=0.7, loss_function="l2").to(setup.device)
    loss.make_value_estimator(gamma=0.99)
    updater = SoftUpdate(loss, tau=0.005)

    def adam(params):
        return torch.optim.Adam(list(params), lr=torch.tensor(3e-4, device=setup.device), fused=True)

    optimizers = [
        adam(loss.actor_network_params.values(True, True)),
        adam(loss.qvalue_network_params.values(True, True)),
        adam(loss.value_network_params.values(True, True)),
    ]

    def step(batch):
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        out = loss(batch)
        (out["loss_actor"] + out["loss_qvalue"] + out["loss_value"]).backward()
        for optimizer in optimizers:
            optimizer.step()
        updater.step()
        return out.detach()

    return torch.compile(step) if mode == "compile" else step


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_block(step, batch, n: int, device) -> float:
    """Milliseconds per update over ``n`` consecutive updates."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(n):
        step(batch)
    _sync(device)
    return (time.perf_counter() - start) * 1000 / n


# ------------------------------------------------------------------------------------- the limit
def step_gemms(setup: Setup, order: str = "paper") -> list[tuple[int, int, int, int]]:
    """(batch_of_matrices, m, k, n) of every GEMM of one IQL step, forward and backward.

    Networks: actor obs→H…→act, critics (obs+act)→H…→1 (an ensemble of 2: one batched GEMM),
    V obs→H…→1. A linear layer's forward is [B, in]·[in, out]; its backward needs grad_W
    ([out, B]·[B, in]) and, except for the first layer, grad_x ([B, out]·[out, in]).
    """
    b, o, a, h = setup.batch_size, setup.obs_dim, setup.action_dim, setup.hidden_sizes

    def widths(inp, out):
        return list(zip((inp, *h), (*h, out)))

    actor, critic, value = widths(o, a), widths(o + a, 1), widths(o, 1)

    def forward(layers, ensemble=1):
        return [(ensemble, b, i, j) for i, j in layers]

    def backward(layers, ensemble=1):
        gemms = [(ensemble, j, b, i) for i, j in layers]  # grad_W
        gemms += [(ensemble, b, j, i) for i, j in layers[1:]]  # grad_x
        return gemms

    gemms = forward(critic, 2) + forward(value) + backward(value)  # target critics, V(s) with grad
    if order == "paper":
        gemms += forward(value)  # V(s) again with the new V
    gemms += forward(value)  # V(s')
    gemms += forward(critic, 2) + backward(critic, 2)  # online critics
    gemms += forward(actor) + backward(actor)
    return gemms


def gemm_flops(gemms) -> int:
    return sum(2 * e * m * k * n for e, m, k, n in gemms)


def time_gemms(gemms, device, reps: int = 200) -> float:
    """Sum over the step's GEMMs of each one's median time in isolation, in milliseconds."""
    total = 0.0
    for e, m, k, n in gemms:
        x = torch.randn(e, m, k, device=device).squeeze(0)
        w = torch.randn(e, k, n, device=device).squeeze(0)
        fn = torch.bmm if e > 1 else torch.mm
        for _ in range(10):
            fn(x, w)
        samples = []
        for _ in range(5):
            _sync(device)
            start = time.perf_counter()
            for _ in range(reps // 5):
                fn(x, w)
            _sync(device)
            samples.append((time.perf_counter() - start) * 1000 / (reps // 5))
        total += statistics.median(samples)
    return total


def square_matmul_gflops(device, size: int = 2048) -> float:
    x = torch.randn(size, size, device=device)
    for _ in range(3):
        x @ x
    _sync(device)
    start = time.perf_counter()
    for _ in range(10):
        x @ x
    _sync(device)
    return 2 * size**3 * 10 / (time.perf_counter() - start) / 1e9


# ------------------------------------------------------------------------------------- memory
def step_memory_mb(step, batch, device) -> float:
    """Bytes of tensors saved for backward in one step (activations), plus parameters, grads and
    Adam state; on CUDA the allocator's peak instead."""
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        step(batch)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(batch)
    loss = step.loss
    states = sum(
        v.numel() * v.element_size()
        for opt in step.optimizers.values()
        for s in opt.state.values()
        for v in s.values()
        if torch.is_tensor(v)
    )
    params = sum(p.numel() * p.element_size() for p in loss.parameters()) * 2  # + grads
    targets = sum(p.numel() * p.element_size() for p in loss.target_qvalue_network_params.values(True, True))
    return (sum(saved) + states + params + targets) / 2**20


# ------------------------------------------------------------------------------------- runs
def measure(setup: Setup, modes, reps: int, block: int, include_torchrl: bool = True, orders=("paper", "summed"),
            bf16: bool = False):
    batch = make_batch(setup)
    candidates = []
    for mode in modes:
        for order in orders:
            candidates.append(({"impl": "iql_torchrl", "mode": mode, "order": order, "dtype": "float32"},
                               iql_torchrl_step(setup, mode, order)))
        if bf16:
            candidates.append(({"impl": "iql_torchrl", "mode": mode, "order": "paper", "dtype": "bfloat16"},
                               iql_torchrl_step(setup, mode, "paper", "bfloat16")))
        if include_torchrl and mode != "cudagraphs":
            candidates.append(({"impl": "torchrl", "mode": mode, "order": "summed", "dtype": "float32"},
                               torchrl_step(setup, mode)))
    compile_s = {}
    for row, step in candidates:  # warm-up: the first calls compile / capture
        start = time.perf_counter()
        for _ in range(3 if row["mode"] == "eager" else 12):
            step(batch)
        _sync(setup.device)
        compile_s[id(step)] = time.perf_counter() - start if row["mode"] != "eager" else 0.0
    samples = {id(step): [] for _, step in candidates}
    for _ in range(reps):  # interleaved repetitions
        for _, step in candidates:
            samples[id(step)].append(time_block(step, batch, block, setup.device))
    rows = []
    for row, step in candidates:
        ms = samples[id(step)]
        median = statistics.median(ms)
        rows.append({
            **row,
            "updates_per_s": 1000 / median,
            "ms_per_update": median,
            "min": min(ms),
            "max": max(ms),
            "compile_s": compile_s[id(step)],
        })
    return rows, candidates, batch


def print_table(rows, limit_ms, title):
    print(f"\n{title}")
    torchrl_by_mode = {r["mode"]: r["ms_per_update"] for r in rows if r["impl"] == "torchrl"}
    header = f"{'impl':<12} {'mode':<10} {'order':<7} {'dtype':<9} {'upd/s':>8} {'ms/upd':>8} {'min':>7} {'max':>7} {'compile s':>9} {'vs torchrl':>10} {'of limit':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        base = torchrl_by_mode.get(r["mode"], torchrl_by_mode.get("compile"))
        ratio = f"{base / r['ms_per_update']:.2f}x" if base else "-"
        print(
            f"{r['impl']:<12} {r['mode']:<10} {r['order']:<7} {r['dtype']:<9} {r['updates_per_s']:>8.1f} {r['ms_per_update']:>8.2f} "
            f"{r['min']:>7.2f} {r['max']:>7.2f} {r['compile_s']:>9.1f} {ratio:>10} {limit_ms / r['ms_per_update']:>7.0%}"
        )


def scaling(base: Setup, modes, reps, block, quick: bool):
    batches = (256, 1024) if quick else (256, 1024, 4096)
    widths = (256, 512) if quick else (256, 512, 1024)
    configs = [("batch", b, Setup(**{**base.__dict__, "batch_size": b})) for b in batches]
    configs += [("width", w, Setup(**{**base.__dict__, "hidden": w})) for w in widths if w != base.hidden]
    out = []
    for axis, value, setup in configs:
        rows, candidates, batch = measure(setup, modes, reps, block, include_torchrl=False, orders=("paper",))
        for row, (_, step) in zip(rows, candidates):
            out.append({
                "axis": axis, "batch_size": setup.batch_size, "hidden": setup.hidden, "mode": row["mode"],
                "updates_per_s": row["updates_per_s"], "ms_per_update": row["ms_per_update"],
                "memory_mb": step_memory_mb(step, batch, setup.device),
                "limit_updates_per_s": 1000 / time_gemms(step_gemms(setup), setup.device, reps=50),
            })
            print(f"  {axis}={value:<5} {row['mode']:<8} {row['updates_per_s']:8.1f} upd/s  {out[-1]['memory_mb']:8.1f} MiB  limit {out[-1]['limit_updates_per_s']:8.1f} upd/s")
    return out


def plot_scaling(points, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    for ax, axis, key in ((axes[0], "batch", "batch_size"), (axes[1], "width", "hidden")):
        pts = [p for p in points if p["axis"] == axis or (axis == "width" and p["axis"] == "batch" and p["batch_size"] == 256)]
        for mode in sorted({p["mode"] for p in pts}):
            xs = sorted({p[key] for p in pts if p["mode"] == mode})
            ys = [next(p["updates_per_s"] for p in pts if p["mode"] == mode and p[key] == x) for x in xs]
            ax.plot(xs, ys, marker="o", label=f"iql_torchrl {mode}")
        xs = sorted({p[key] for p in pts})
        limit = [next(p["limit_updates_per_s"] for p in pts if p[key] == x) for x in xs]
        ax.plot(xs, limit, ls="--", color="gray", label="GEMM limit")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size (width 256)" if axis == "batch" else "hidden width (batch 256)")
        ax.set_ylabel("updates / s")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle("IQL update step scaling", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--obs-dim", type=int, default=17)
    parser.add_argument("--action-dim", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--reps", type=int, default=7, help="interleaved repetitions")
    parser.add_argument("--block", type=int, default=50, help="updates per timed block")
    parser.add_argument("--no-compile", action="store_true", help="eager rows only")
    parser.add_argument("--bf16", action="store_true", help="also iql_torchrl rows under bfloat16 autocast")
    parser.add_argument("--scaling", action="store_true", help="also measure batch/width scaling")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and scaling points")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--png", default=None, help="scaling plot (with --scaling)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.reps, args.block = 3, 20
    setup = Setup(args.batch_size, args.obs_dim, args.action_dim, args.hidden, args.layers, args.device)
    modes = ["eager"] + ([] if args.no_compile else ["compile"])
    if str(args.device).startswith("cuda") and not args.no_compile:
        modes.append("cudagraphs")

    rows, _, _ = measure(setup, modes, args.reps, args.block, bf16=args.bf16)
    gemms = step_gemms(setup)
    limit_ms = time_gemms(gemms, args.device)
    flops = gemm_flops(gemms)
    result = {
        "device": torch.cuda.get_device_name() if str(args.device).startswith("cuda") else f"cpu ({_cpu_name()})",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "iql_torchrl": iql_torchrl.__version__,
        "batch_size": setup.batch_size,
        "hidden": setup.hidden,
        "layers": setup.layers,
        "obs_dim": setup.obs_dim,
        "action_dim": setup.action_dim,
        "rows": rows,
        "flops_per_update": flops,
        "gemm_only_ms": limit_ms,
        "limit_updates_per_s": 1000 / limit_ms,
        "square_matmul_gflops": square_matmul_gflops(args.device),
        "scaling": [],
    }
    print_table(rows, limit_ms, f"IQL update step, B={setup.batch_size}, obs {setup.obs_dim}, act {setup.action_dim}, "
                f"{setup.layers}x{setup.hidden} MLPs, {result['device']}, {result['threads']} threads")
    print(f"\nlimit (the step's {len(gemms)} GEMMs alone, paper order): {limit_ms:.2f} ms = "
          f"{1000 / limit_ms:.0f} upd/s; {flops / 1e9:.3f} GFLOP/update; "
          f"square 2048 matmul: {result['square_matmul_gflops']:.0f} GFLOP/s")
    if args.scaling:
        print("\nscaling (paper order):")
        result["scaling"] = scaling(setup, modes if not args.quick else ["eager"], max(3, args.reps // 2), args.block, args.quick)
        if args.png:
            plot_scaling(result["scaling"], args.png)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    sys.exit(main() and 0)
