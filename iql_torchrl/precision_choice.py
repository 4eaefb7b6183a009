"""Whether the update step's bf16 GEMMs pay on this host: ``precision="auto"``, a forced bf16's cost.

``precision="auto"`` (:func:`choose_precision`) takes bf16 (:mod:`iql_torchrl.step.precision`) only where it pays
and was measured not to change learning: layers at least :data:`AUTO_MIN_FEATURES` (256) wide, a CPU with native
bf16 (AVX512_BF16 or AMX), a compiled step, and a measurement on this process's threads (:func:`bf16_speedup`)
showing the wide layer's GEMMs at least :data:`PAYS` times faster in bf16. A run whose threads are its own choice
(``--threads auto``) may also take one thread (:func:`one_thread_speedup`): a bf16 GEMM of the step's size keeps
one thread busy while the others idle, and an idle thread that falls asleep is woken after each GEMM. A bf16 GEMM
on a CPU without native bf16 is emulated, many times slower; a forced bf16 there says what it costs
(:func:`bf16_cost`). On CUDA ``auto`` is float32: at the paper's batch of 256 bf16 gave nothing on an H100.
The measurements behind each choice: docs/fused-step.md and docs/performance.md.
"""
from __future__ import annotations

import functools
import statistics
import time
import warnings
from typing import NamedTuple

import torch
from torch import nn

from iql_torchrl.objectives.checks import NETWORKS

__all__ = ["PRECISIONS", "MIN_FEATURES", "AUTO_MIN_FEATURES", "PAYS", "ONE_THREAD_PAYS", "PrecisionChoice", "native_bf16",
           "bf16_speedup", "one_thread_speedup", "choose_precision", "bf16_cost", "widest_layer", "resolve_precision"]

PRECISIONS = ("auto", "fp32", "bf16")
MIN_FEATURES = 64  # a layer whose weight has both dims at least this computes in bf16 under precision "bf16"
# auto takes bf16 only for layers at least this wide in both dims: where it was measured to learn as fp32 does
# (at 2×64 it did not on every seed: docs/performance.md)
AUTO_MIN_FEATURES = 256
PAYS = 1.3  # auto takes bf16 where the wide layer's GEMMs are at least this much faster in it
ONE_THREAD_PAYS = 1.5  # and one thread where its bf16 GEMMs are at least this much faster there (see one_thread_speedup)


def native_bf16() -> str | None:
    """The CPU's native bfloat16 instructions (``"AMX"``, ``"AVX512_BF16"``), or ``None``."""
    if torch.cpu._is_amx_tile_supported():
        return "AMX"
    if torch.cpu._is_avx512_bf16_supported():
        return "AVX512_BF16"
    return None


def widest_layer(loss, min_features: int = MIN_FEATURES) -> tuple[tuple[int, int] | None, int]:
    """``(out, in)`` of the largest ``nn.Linear`` in ``loss``'s trained networks wide enough for bf16 (``None``:
    none is), and how many copies of it one batched GEMM computes (the seeds of a vmapped ``SeedEnsemble``)."""
    shapes = [tuple(m.weight.shape) for name in NETWORKS for m in getattr(loss, f"{name}_network").modules()
              if isinstance(m, nn.Linear) and min(m.weight.shape) >= min_features]
    return max(shapes, key=lambda s: s[0] * s[1], default=None), getattr(loss, "num_seeds", 1)


def bf16_speedup(out_features: int, in_features: int, batch: int, stacked: int = 1) -> float:
    """How many times faster a layer's three GEMMs (forward, input and weight gradients) run from bfloat16
    copies than in float32, on this process's threads, each followed by a parallel elementwise op as in
    the step (so a GEMM that leaves a thread idle long enough to fall asleep pays its wake-up). ``stacked``:
    how many copies of the layer one batched GEMM computes (the seeds of a vmapped ``SeedEnsemble``).

    Measured once per process and thread count: the run's choice and the step's own check of it read the
    same figure."""
    fp32, bf16 = _layer_times(out_features, in_features, batch, stacked, torch.get_num_threads())
    return fp32 / bf16


def one_thread_speedup(out_features: int, in_features: int, batch: int, stacked: int = 1) -> float:
    """How many times faster the layer's bf16 GEMMs (as :func:`bf16_speedup` times them) run on one thread
    than on this process's threads. Above 1 where the bf16 GEMM keeps one thread busy and leaves the others
    idle long enough to fall asleep: each of the step's parallel ops after it then pays their wake-up.

    The rest of the step loses the other threads, so the GEMMs' gain overstates the step's: hence
    :data:`ONE_THREAD_PAYS`, above :data:`PAYS` (the measurements: docs/fused-step.md, "One thread for a bf16
    run")."""
    threads = torch.get_num_threads()
    if threads == 1:
        return 1.0
    return _layer_times(out_features, in_features, batch, stacked, threads)[1] / \
        _layer_times(out_features, in_features, batch, stacked, 1)[1]


@functools.cache
def _layer_times(out_features: int, in_features: int, batch: int, stacked: int, threads: int,
                 rounds: int = 5, calls: int = 10) -> tuple[float, float]:
    """Seconds for ``calls`` passes of the layer's three GEMMs in float32 and in bfloat16, on ``threads``
    threads (torch's own count is restored after)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(stacked, out_features, in_features, generator=g)
    h = torch.randn(stacked, in_features, batch, generator=g)
    grad = torch.randn(stacked, out_features, batch, generator=g)

    operands = {dtype: (w.to(dtype), h.to(dtype), grad.to(dtype)) for dtype in (torch.float32, torch.bfloat16)}
    epilogue = torch.empty(stacked, out_features, batch)  # what the step's fused kernel after each GEMM does

    def layer(dtype):
        weight, x, y = operands[dtype]
        for a, b in ((weight, x), (y, x.transpose(1, 2)), (weight.transpose(1, 2), y)):
            torch.mm(a[0], b[0]) if stacked == 1 else torch.bmm(a, b)
            torch.relu_(epilogue)

    def timed(dtype) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            layer(dtype)
        return time.perf_counter() - start

    own = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for dtype in (torch.float32, torch.bfloat16):  # warm up: kernels chosen, weights packed
            timed(dtype)
        fp32, bf16 = [], []
        for _ in range(rounds):
            fp32.append(timed(torch.float32))
            bf16.append(timed(torch.bfloat16))
    finally:
        torch.set_num_threads(own)
    return statistics.median(fp32), statistics.median(bf16)


class PrecisionChoice(NamedTuple):
    """What ``precision="auto"`` chose, why in words, and the threads to run on (``None``: the caller's)."""
    precision: str
    reason: str
    threads: int | None = None


def choose_precision(device_type: str, compiled: bool, layer: tuple[int, int] | None,
                     batch: int = 256, stacked: int = 1, may_take_one_thread: bool = False) -> PrecisionChoice:
    """``precision="auto"`` for a step on ``device_type`` whose widest bf16-eligible layer is ``layer``
    (``(out, in)``, ``None``: no layer is wide enough), computed ``stacked`` times in one batched GEMM (a step
    of that many vmapped seeds). ``may_take_one_thread``: the caller's thread count is its own choice
    (``--threads auto``), and bf16 on one thread competes with both formats on the caller's threads."""
    if device_type != "cpu":
        return PrecisionChoice("fp32", f"on {device_type} bf16 gave nothing at the paper's batch size "
                                       "(--precision bf16 forces it)")
    if layer is None:
        return PrecisionChoice("fp32", f"no layer is {MIN_FEATURES} wide or more in both dimensions")
    if min(layer) < AUTO_MIN_FEATURES:
        return PrecisionChoice("fp32", (f"its widest layer, {layer[0]}×{layer[1]}, is narrower than the "
                                        f"{AUTO_MIN_FEATURES}×{AUTO_MIN_FEATURES} at which bf16 was measured to "
                                        "learn as fp32 does (docs/performance.md)"))
    native = native_bf16()
    if native is None:
        return PrecisionChoice("fp32", "this CPU has no native bf16 (AVX512_BF16 or AMX): its bf16 GEMMs are "
                                       "emulated, slower")
    if not compiled:
        return PrecisionChoice("fp32", "the eager step spends its time outside the GEMMs: bf16 pays in the "
                                       "compiled step")
    speedup = bf16_speedup(*layer, batch, stacked)
    shape = f"{layer[0]}×{layer[1]}" + (f" (×{stacked} seeds)" if stacked > 1 else "")
    threads = torch.get_num_threads()
    alone = one_thread_speedup(*layer, batch, stacked) if may_take_one_thread else 1.0
    if alone >= ONE_THREAD_PAYS and speedup * alone >= PAYS:
        return PrecisionChoice("bf16", (
            f"this CPU has {native} and the {shape} layers' GEMMs measured {speedup * alone:.2f}× faster in bf16 "
            f"on one thread than in fp32 on {threads} ({speedup:.2f}× in bf16 on {threads}: each of their "
            f"GEMMs keeps one thread busy and wakes the others after it); thinner layers stay fp32"), 1)
    if speedup < PAYS:
        return PrecisionChoice("fp32", (f"this CPU has {native}, but its {shape} layers' GEMMs measured "
                                        f"{speedup:.2f}× in bf16 here, under the {PAYS}× that pays"))
    return PrecisionChoice("bf16", (f"this CPU has {native} and the {shape} layers' GEMMs measured {speedup:.2f}× "
                                    f"faster in bf16 here; thinner layers stay fp32"))


def bf16_cost(device_type: str, layer: tuple[int, int] | None, batch: int = 256, compiled: bool = True,
              stacked: int = 1) -> str | None:
    """For a forced ``precision="bf16"``: what it costs on this host, in words, or ``None`` where it pays."""
    if device_type != "cpu" or layer is None:
        return None
    if not compiled:  # measured slower even with native bf16: docs/fused-step.md
        return ("the eager step runs slower in bf16 than in fp32 (the mode's per-op dispatch costs more than its "
                "GEMMs save); bf16 pays in the compiled step")
    speedup = bf16_speedup(*layer, batch, stacked)
    if speedup >= 1.0:
        return None
    native = native_bf16() or "no native bf16 (AVX512_BF16 or AMX)"
    return (f"bf16 runs the {layer[0]}×{layer[1]} layers' GEMMs {1 / speedup:.1f}× slower than fp32 on this CPU "
            f"({native}); --precision fp32 (or auto) is faster here")


def resolve_precision(precision: str, loss, device_type: str, compiled: bool,
                      min_features: int = MIN_FEATURES) -> tuple[str, str]:
    """The precision a step of ``loss`` runs in and why, in words: ``"auto"`` chosen by :func:`choose_precision`; a
    forced ``"bf16"`` that costs time on this host warns, saying how much (:func:`bf16_cost`)."""
    layer, seeds = widest_layer(loss, min_features)
    if precision == "auto":
        return choose_precision(device_type, compiled, layer, stacked=seeds)[:2]
    if precision == "bf16" and (cost := bf16_cost(device_type, layer, compiled=compiled, stacked=seeds)) is not None:
        warnings.warn(f"IQLUpdate(precision='bf16'): {cost}.", UserWarning, stacklevel=3)
    return precision, "asked for"
