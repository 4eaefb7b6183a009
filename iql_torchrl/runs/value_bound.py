"""The value estimates' sanity bound: no return the data's rewards allow exceeds max |r| / (1 − γ).

A run watches the mean V(s) of its logged batches against it and warns once when it is exceeded:
no policy earns such values, so the estimates are diverging (seen with a high expectile on long tasks
without terminal states, docs/mazes.md).
"""
from __future__ import annotations

import warnings

import torch

__all__ = ["return_bound", "ValueBoundWatch"]


def return_bound(rewards: torch.Tensor, gamma: float) -> float | None:
    """The largest |discounted return| rewards like these allow, max |r| / (1 − γ); None for γ = 1."""
    return float(rewards.abs().max()) / (1 - gamma) if gamma < 1 else None


class ValueBoundWatch:
    """Remembers the first logged step whose mean V(s) exceeded ``bound`` (``None``: nothing to watch)."""

    def __init__(self, bound: float | None = None, beyond_at: int | None = None):
        self.bound, self.beyond_at = bound, beyond_at

    def watch(self, value: float | None, step: int, speak: bool = True) -> None:
        """Checks one logged mean V(s); warns (where ``speak``: rank 0 speaks for the run) the first time it is beyond."""
        if self.bound is None or self.beyond_at is not None or value is None:
            return
        if abs(value) > self.bound:
            self.beyond_at = step
            if speak:
                warnings.warn(
                    f"Update {step}: the mean V(s) of the batch is {value:.4g}, beyond {self.bound:.4g}, the "
                    f"largest |return| the data's rewards allow (max |r| / (1 - gamma)): the value estimates are diverging "
                    "and the policy usually degrades from here. Seen with a high --expectile on long tasks without "
                    "terminal states (docs/mazes.md): try a lower --expectile, --success-terminal on goal data, or fewer --steps.",
                    stacklevel=3,
                )
