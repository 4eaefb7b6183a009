"""Checks of transition data, each raising a :class:`DatasetError` that names the field, the
episode and a fix: non-finite values, discrete action indices out of range, Box actions outside
the environment's bounds."""

from __future__ import annotations

import torch
from tensordict import TensorDictBase

__all__ = [
    "ACTION_BOUND_TOLERANCE",
    "DatasetError",
    "OutOfBoundsActions",
    "check_action_indices",
    "check_finite",
    "field_name",
]

ACTION_BOUND_TOLERANCE = 1e-6
"""An action exceeds its bound when it is past it by more than this fraction of the bound's
magnitude (at least 1): float32 rounding of an in-bound action never trips it."""

FLOAT_FIELDS = ("observation", ("next", "observation"), ("next", "reward"))


class DatasetError(ValueError):
    """A dataset that cannot be used: empty, non-finite values, wrong shapes, unreadable files."""


def field_name(key) -> str:
    """``"next/reward"`` for ``("next", "reward")``."""
    return key if isinstance(key, str) else "/".join(key)


def check_finite(transitions: TensorDictBase, episode_label: str | None) -> None:
    """Raise a DatasetError naming the field and episode of the first NaN/inf."""
    keys = FLOAT_FIELDS + (("action",) if transitions.get("action").is_floating_point() else ())
    for key in keys:
        value = transitions.get(key)
        bad = ~torch.isfinite(value).reshape(value.shape[0], -1).all(dim=-1)
        if bad.any():
            row = int(bad.nonzero()[0, 0])
            label = episode_label or f"episode {int(transitions.get('episode')[row])}"
            kind = "NaN" if torch.isnan(value[row]).any() else "inf"
            raise DatasetError(
                f"Field {field_name(key)!r} holds {kind} in {label} (transition {row} of the "
                f"{'episode' if episode_label else 'data'}): "
                "fix or drop that episode before training."
            )


def check_action_indices(action: torch.Tensor, episode: torch.Tensor, num_actions: int, source: str) -> None:
    """Every discrete action must be an index in ``[0, num_actions)``; else name the first bad one."""
    bad = (action < 0) | (action >= num_actions)
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        raise DatasetError(
            f"Field 'action' holds index {int(action[row])} in episode {int(episode[row])} but {source} has "
            f"{num_actions} actions (valid indices 0..{num_actions - 1}); {int(bad.sum())} of {action.numel()} "
            "actions are out of range. The data does not belong to this action space: fix or drop those episodes."
        )


class OutOfBoundsActions:
    """Counts, per episode, the Box actions past the environment's bounds (beyond the tolerance).

    Feed it chunks with :meth:`add`; :meth:`describe` reports the total count and fraction and
    the runs of consecutive episodes that hold them, with their own counts and fractions.
    """

    def __init__(self, low: torch.Tensor, high: torch.Tensor, episode_index_count: int):
        self.low = low.to(torch.float64)
        self.high = high.to(torch.float64)
        self.low_tolerance = ACTION_BOUND_TOLERANCE * self.low.abs().clamp_min(1.0)
        self.high_tolerance = ACTION_BOUND_TOLERANCE * self.high.abs().clamp_min(1.0)
        self.bad = torch.zeros(episode_index_count, dtype=torch.int64)
        self.total = torch.zeros(episode_index_count, dtype=torch.int64)
        self.worst = 0.0

    def add(self, action: torch.Tensor, episode_index: torch.Tensor) -> None:
        """``action`` raw ``[n, action_dim]``; ``episode_index`` the episode's position ``[n]``."""
        action = action.to(torch.float64).cpu()
        episode_index = episode_index.cpu()
        excess = torch.maximum(action - self.high, self.low - action)
        bad = ((action > self.high + self.high_tolerance) | (action < self.low - self.low_tolerance)).any(-1)
        self.bad.index_add_(0, episode_index, bad.to(torch.int64))
        self.total.index_add_(0, episode_index, torch.ones_like(episode_index))
        if bad.any():
            self.worst = max(self.worst, float(excess[bad].max()))

    @property
    def count(self) -> int:
        return int(self.bad.sum())

    def describe(self, episode_ids: torch.Tensor, bounds: str, max_ranges: int = 5) -> str:
        """``"N of M actions (F%) ... episodes a–b: n of m (f%); ..."``."""
        total = int(self.total.sum())
        ranges, start = [], None
        has_bad = (self.bad > 0).tolist() + [False]
        for position, flag in enumerate(has_bad):
            if flag and start is None:
                start = position
            elif not flag and start is not None:
                ranges.append((start, position))
                start = None
        parts = []
        for first, stop in ranges[:max_ranges]:
            bad, seen = int(self.bad[first:stop].sum()), int(self.total[first:stop].sum())
            label = f"episode {int(episode_ids[first])}" if stop - first == 1 else (
                f"episodes {int(episode_ids[first])}-{int(episode_ids[stop - 1])}"
            )
            parts.append(f"{label}: {bad} of {seen} ({100 * bad / seen:.1f}%)")
        if len(ranges) > max_ranges:
            parts.append(f"and {len(ranges) - max_ranges} more episode ranges")
        return (
            f"{self.count} of {total} actions ({100 * self.count / total:.1f}%) lie outside the environment's "
            f"bounds {bounds} (by up to {self.worst:.4g}): " + "; ".join(parts)
        )

