"""A compiled step proves itself: its first calls are also taken eagerly, from the same state, and compared.

A compiler can be wrong without saying so (inductor has miscompiled in-place foreach ops on CUDA,
pytorch/pytorch#198033). :class:`EagerCheck` runs one call of a compiled step, keeps what it wrote, puts the
state back, runs the eager step on the same input and compares each parameter tensor. One Adam step moves a
weight by about its learning rate: a correct step leaves each tensor a rounding error from the eager one, a
wrong step of any one tensor (a 6-element log-std too: the bound is per tensor) about a learning rate or more.
When they agree the compiled result stands, bitwise; when not, :class:`StepMismatch` names the network, its
furthest tensor and how far. False alarms over seeds and precisions: ``benchmarks/bench_eager_check.py``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["EagerCheck", "StepMismatch", "TensorGap", "tolerance"]

_ROUNDING = 8 * torch.finfo(torch.float32).eps  # float32 rounding of a tensor's values, relative to their size


def tolerance(precision: str) -> float:
    """The largest root-mean-square difference a checked call may leave between a tensor's compiled and eager
    values, as a fraction of its network's learning rate.

    A wrongly stepped tensor is off by about 1 or more. A correct step's worst case is the first update: Adam
    divides each gradient by its own magnitude, so a near-0 gradient whose rounding differs can move its weight
    up to 2 learning rates apart; bf16 GEMMs (8 significant bits) round differently more often, hence its wider
    bound, still well under 1.
    """
    return 0.3 if precision == "bf16" else 0.05


class StepMismatch(RuntimeError):
    """A compiled step that disagrees with the eager step; ``eager_output`` is the eager call's return value."""

    def __init__(self, message: str, eager_output=None):
        super().__init__(message)
        self.eager_output = eager_output


class EagerCheck:
    """Runs one call of a compiled step and the same call eagerly, from the same state, and compares them.

    Args:
        networks: returns ``name -> (tensors by name, learning rate)``: what is compared, and the rate (a number
            or a 0-d tensor) its bound is a fraction of.
        state: returns every tensor a call writes (parameters, optimizer state, counters): copied before the
            compiled call, put back before the eager one.
        random: the step draws random numbers (dropout): the generators' states are put back too.
        tolerance: the bound on each tensor's root-mean-square difference, in learning rates (:func:`tolerance`).
    """

    def __init__(self, networks, state, *, random: bool = False, tolerance: float = 0.05):
        self.networks = networks
        self.state = state
        self.random = random
        self.tolerance = tolerance
        self.checked = 0  # calls checked so far
        self.largest = {}  # network name -> the largest difference of one of its tensors, in learning rates
        self.last = {}  # network name -> each tensor's difference at the latest checked call (TensorGap)

    def __call__(self, compiled, eager, x, *, keep_eager: bool = False):
        """``compiled(x)``'s output, after checking it against ``eager(x)``. On a mismatch raises
        :class:`StepMismatch` with the state at the eager call's result (``keep_eager``) or as before the call."""
        tensors = self.state()
        before = _copies(tensors)
        generators = _generator_states() if self.random else None
        out = compiled(x)
        after = _copies(tensors)
        compiled_values = {name: _copies(named.values()) for name, (named, _) in self.networks().items()}
        generators_after = _generator_states() if self.random else None
        _restore(tensors, before, generators)
        eager_out = eager(x)
        self.checked += 1
        wrong = {}
        for name, (named, lr) in self.networks().items():
            gaps = self.last[name] = self._gaps(named, compiled_values[name], float(lr))
            self.largest[name] = max([self.largest.get(name, 0.0), *(gap.ratio for gap in gaps)])
            worst = max(gaps, key=lambda gap: gap.excess, default=None)
            if worst is not None and worst.excess > 0:
                wrong[name] = worst
        if not wrong:
            _restore(tensors, after, generators_after)
            return out
        if not keep_eager:
            _restore(tensors, before, generators)
        described = "; ".join(
            f"{name} parameters differ by {w.rms:.2e} in {w.tensor} (root mean square: {w.ratio:.3g}× its learning "
            f"rate {w.lr:.2e}, allowed {self.tolerance}×; at most {w.largest:.2e})" for name, w in wrong.items())
        raise StepMismatch(f"the compiled step disagrees with the eager step on the same state and batch: {described}",
                           eager_out)

    def _gaps(self, named: dict, compiled: list[Tensor], lr: float) -> list[TensorGap]:
        """Each tensor's difference between its ``compiled`` value and its eager one (``named``), and its bound."""
        gaps = []
        for (key, eager), other in zip(named.items(), compiled):
            eager = eager.detach().double()
            diff = other.double() - eager
            # a learning rate near 0 (the end of a cosine) still leaves the rounding of the values themselves
            bound = self.tolerance * lr + _ROUNDING * _rms(eager)
            gaps.append(TensorGap(key, _rms(diff), bound, lr, float(diff.abs().max()), diff.numel()))
        return gaps


class TensorGap(NamedTuple):
    """One tensor's compiled-minus-eager difference: root mean square, bound, learning rate, largest, size."""
    tensor: str
    rms: float
    bound: float
    lr: float
    largest: float
    numel: int

    @property
    def excess(self) -> float:
        return self.rms - self.bound

    @property
    def ratio(self) -> float:
        """The difference in learning rates (infinite for any difference at a learning rate of 0)."""
        return self.rms / self.lr if self.lr > 0 else (0.0 if self.rms == 0 else float("inf"))


def _rms(tensor: Tensor) -> float:
    return float(tensor.square().mean().sqrt()) if tensor.numel() else 0.0


def _copies(tensors) -> list[Tensor]:
    return [t.detach().clone() for t in tensors]


def _restore(tensors: list[Tensor], values: list[Tensor], generators) -> None:
    with torch.no_grad():
        torch._foreach_copy_(tensors, values)
    if generators is not None:
        cpu, cuda = generators
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _generator_states():
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.random.get_rng_state(), cuda
