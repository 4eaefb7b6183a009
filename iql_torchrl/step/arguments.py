"""IQLUpdate's arguments, checked once where it is built (and a setting each time it is changed)."""
from __future__ import annotations

from iql_torchrl.objectives.checks import is_finite_number
from iql_torchrl.step.modes import check_mode
from iql_torchrl.precision_choice import PRECISIONS

__all__ = ["ORDERS", "OPTIMIZERS", "check_arguments", "check_setting", "check_total_steps", "optimizer_settings_problem"]

ORDERS = ("paper", "summed")
OPTIMIZERS = ("adam", "adamw")


def optimizer_settings_problem(settings: dict[str, float | None]) -> tuple[str, str] | None:
    """The first of ``settings`` (``lr``, ``<network>_lr``, ``tau``, ``weight_decay``; None: unset) out of
    its range and what it must be, e.g. ``("tau", "in (0, 1], e.g. 0.005")``; None when all are valid."""
    valid = {
        "tau": (lambda v: 0 < v <= 1, "in (0, 1], e.g. 0.005"),
        "weight_decay": (lambda v: v >= 0, "a finite number >= 0"),
    }
    for name, value in settings.items():
        ok, requirement = valid.get(name, (lambda v: v > 0, "a finite number > 0, e.g. 3e-4"))
        if value is not None and not (is_finite_number(value) and ok(value)):
            return name, requirement
    return None


def check_setting(name: str, value) -> None:
    """Raises when ``value`` is out of the range of the setting ``name`` (see :func:`optimizer_settings_problem`)."""
    if (problem := optimizer_settings_problem({name: value})) is not None:
        raise ValueError(f"{name} must be {problem[1]}, got {value!r}.")


def check_total_steps(total_steps) -> None:
    if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0):
        raise ValueError(f"total_steps must be a positive integer or None, got {total_steps!r}.")


def check_arguments(*, order: str, mode: str, device_type: str, optimizer: str, precision: str,
                    bf16_min_features: int, total_steps: int | None, tau: float, weight_decay: float,
                    learning_rates: dict[str, float]) -> None:
    """Raises on the first of IQLUpdate's arguments that is invalid, naming it and what it must be; the mode is
    checked first, before any work (a compiled mode needs a compiler here, ``"cudagraphs"`` needs CUDA)."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}.")
    check_mode(mode, device_type, "IQLUpdate")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}.")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
    if not (isinstance(bf16_min_features, int) and bf16_min_features >= 1):
        raise ValueError(f"bf16_min_features must be an int of at least 1, got {bf16_min_features!r}.")
    check_total_steps(total_steps)
    for name, value in {**{f"{g}_lr": r for g, r in learning_rates.items()}, "tau": tau,
                        "weight_decay": weight_decay}.items():
        check_setting(name, value)
