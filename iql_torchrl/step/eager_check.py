"""A compiled step proves itself: its first calls are also taken eagerly, from the same state, and compared.

A compiler can be wrong without saying so (inductor has miscompiled in-place foreach ops on CUDA,
pytorch/pytorch#198033). :class:`EagerCheck` runs one call of a compiled step, keeps what it wrote,
puts the state back as it was, runs the plain (eager) step on the same input, and compares what each
network's parameters became. One Adam step moves a weight by about its learning rate, so the two
results of a correct compiled step differ by a rounding error far below it (after one update on an
H100 at the default shapes: 1e-6 for a learning rate of 3e-4), while a miscompiled step is off by
more (1.2e-2). When they agree, the compiled call's result stands, bitwise as if it had not
been checked; when they do not, :class:`StepMismatch` says which network and how far, with the state
either put back as before the call or left at the eager step's result.
"""
from __future__ import annotations

import torch
from tensordict import TensorDictBase
from torch import Tensor

__all__ = ["EagerCheck", "StepMismatch", "tolerance"]


def tolerance(precision: str) -> float:
    """The largest root-mean-square difference a checked call may leave between a network's compiled and eager
    parameters, as a fraction of its learning rate.

    A step that doubles one network's update is off by about 1 (Adam's first step moves every weight with a
    gradient by the learning rate); a correct float32 step by < 0.001 (CPU, the default shapes, 40 updates).
    The first update is the sensitive one: Adam divides each gradient by its own magnitude, so a gradient
    near 0 whose rounding differs moves its weight differently (up to twice the learning rate where its sign
    flips). bf16 GEMMs (``precision="bf16"``, 8 significant bits) widen that where eager and compiled round
    differently: the wide-layer bf16 step measured < 0.01 (CPU, the default shapes, 1 and 2 threads), and bf16
    autocast of every layer 0.16 at the first update, 0.05 at the second; 0.3 covers both.
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
        networks: returns ``name -> (parameters, learning rate)``: the tensors compared, and the learning rate
            (a number or a 0-d tensor, read at the check) their bound is a fraction of.
        state: returns every tensor a call of the step writes (parameters, optimizer state, counters);
            they are copied before the compiled call and put back before the eager one.
        random: the step draws random numbers (dropout): the generators' states are put back too, so
            both calls draw the same.
        tolerance: the bound on the root-mean-square difference, as a fraction of the learning rate
            (:func:`tolerance`).
    """

    def __init__(self, networks, state, *, random: bool = False, tolerance: float = 0.05):
        self.networks = networks
        self.state = state
        self.random = random
        self.tolerance = tolerance
        self.checked = 0  # calls checked so far
        self.largest = {}  # name -> the largest difference seen, as a fraction of the learning rate

    def __call__(self, compiled, eager, x, *, keep_eager: bool = False):
        """``compiled(x)``'s output, after checking it against ``eager(x)``. On a mismatch raises
        :class:`StepMismatch` with the state at the eager call's result (``keep_eager``) or as before the call."""
        tensors = self.state()
        before = _copies(tensors)
        generators = _generator_states() if self.random else None
        out = compiled(x)
        after = _copies(tensors)
        compiled_params = {name: _copies(params) for name, (params, _) in self.networks().items()}
        generators_after = _generator_states() if self.random else None
        _restore(tensors, before, generators)
        # a shallow copy takes what the eager loss writes into a batch (log-probs), which the next call must not see
        eager_out = eager(x.copy() if isinstance(x, TensorDictBase) else x)
        self.checked += 1
        gaps = {}
        for name, (params, lr) in self.networks().items():
            lr = float(lr)
            gap, largest = _differences(compiled_params[name], params)
            # a learning rate near 0 (the end of a cosine) still leaves the rounding of the parameters themselves
            bound = self.tolerance * lr + 8 * torch.finfo(torch.float32).eps * _rms(params)
            gaps[name] = (gap, largest, lr, bound)
            self.largest[name] = max(self.largest.get(name, 0.0), gap / lr if lr > 0 else 0.0)
        wrong = {name: g for name, g in gaps.items() if g[0] > g[3]}
        if not wrong:
            _restore(tensors, after, generators_after)
            return out
        if not keep_eager:
            _restore(tensors, before, generators)
        described = "; ".join(
            f"{name} parameters differ by {gap:.2e} (root mean square: {gap / lr if lr > 0 else float('inf'):.3g}× its "
            f"learning rate {lr:.2e}, allowed {self.tolerance}×; at most {largest:.2e})"
            for name, (gap, largest, lr, _) in wrong.items())
        raise StepMismatch(f"the compiled step disagrees with the eager step on the same state and batch: {described}",
                           eager_out)


def _differences(a: list[Tensor], b: list[Tensor]) -> tuple[float, float]:
    """The root mean square and the largest absolute value of ``a − b`` over every element of the lists."""
    if not a:
        return 0.0, 0.0
    diffs = [(x.detach().double() - y.detach().double()).flatten() for x, y in zip(a, b)]
    every = torch.cat(diffs)
    return float(every.square().mean().sqrt()), float(every.abs().max())


def _rms(tensors: list[Tensor]) -> float:
    return float(torch.cat([t.detach().double().flatten() for t in tensors]).square().mean().sqrt()) if tensors else 0.0


def _copies(tensors: list[Tensor]) -> list[Tensor]:
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
