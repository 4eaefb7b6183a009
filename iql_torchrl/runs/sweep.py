"""``--sweep``: a grid of settings trained in one run, each setting with every seed of ``--num-seeds``.

``--sweep temperature=0,3,6 expectile=0.5,0.7`` is the grid of every combination (3 × 2 settings, in the
order given, the last name varying fastest); with ``--num-seeds K`` each setting trains K seeds, so the run
has 6·K members, vmapped together (:class:`~iql_torchrl.objectives.ensemble.SeedEnsemble`, each member with
its own β and τ). Members are setting-major: member ``m`` has setting ``m // K`` and seed ``--seed + m % K``.
A member is initialised and draws its batches as a run of its seed would, so the members of one seed see
the same batches and settings are compared on equal data.

A member's results are its evaluations' scores (the normalized score, else the return): its final one
and its best; a setting's are their mean ± std over its seeds.
"""
from __future__ import annotations

import itertools
import statistics
from dataclasses import replace

from iql_torchrl.objectives.checks import is_finite_number

__all__ = ["SWEEPABLE", "mean_std", "sweep_problem", "sweep_grid", "swept_names", "sweep_values", "run_members", "member_settings",
           "same_grid", "saved_member_seeds", "sweep_results", "setting_label"]

# the settings a sweep may vary: each one's valid range (as its own flag states it) and its symbol
SWEEPABLE = {
    "temperature": (lambda v: is_finite_number(v) and v >= 0, "a finite number >= 0 (0 is behaviour cloning)", "β"),
    "expectile": (lambda v: is_finite_number(v) and 0 < v < 1, "in (0, 1), e.g. 0.7", "τ"),
}
EXAMPLE = "--sweep temperature=0,3,6 expectile=0.5,0.7"


def sweep_problem(entries) -> str | None:
    """Why ``--sweep ENTRIES`` cannot run (the message names the flag, the entry and what to do), or ``None``."""
    if entries is None:
        return None
    if len(entries) == 0:
        return f"--sweep: needs one or more NAME=V1,V2,... entries, e.g. {EXAMPLE}"
    seen = set()
    for entry in entries:
        name, equals, values = str(entry).partition("=")
        if not equals:
            return f"--sweep {entry}: must be NAME=V1,V2,... (e.g. {EXAMPLE})"
        if name not in SWEEPABLE:
            return f"--sweep {entry}: {name} cannot be swept; the settings a sweep varies are {', '.join(SWEEPABLE)}"
        if name in seen:
            return f"--sweep {entry}: {name} is swept twice; give all its values in one entry"
        seen.add(name)
        texts = [text for text in values.split(",") if text.strip()]
        if not texts:
            return f"--sweep {entry}: needs one or more values, e.g. {name}={'0,3' if name == 'temperature' else '0.5,0.7'}"
        numbers = [_number(text) for text in texts]
        valid, valid_text, _ = SWEEPABLE[name]
        for text, number in zip(texts, numbers):
            if number is None or not valid(number):
                what = "is out of range" if number is not None else "is not a number"
                return f"--sweep {entry}: {text.strip()} {what}; {name} must be {valid_text}"
        if len(set(numbers)) != len(numbers):
            return f"--sweep {entry}: a value repeats; give each once"
    return None


def sweep_values(entries) -> dict[str, tuple[float, ...]]:
    """The checked ``--sweep`` entries as ``{name: values}``, in the order given (``{}`` without a sweep)."""
    grid = {}
    for entry in entries or ():
        name, _, values = entry.partition("=")
        grid[name] = tuple(float(text) for text in values.split(",") if text.strip())
    return grid


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def swept_names(entries) -> tuple[str, ...]:
    """The settings ``--sweep`` varies."""
    return tuple(sweep_values(entries))


def sweep_grid(entries) -> list[dict[str, float]]:
    """Every combination of the swept values (``[{}]`` without a sweep), the last name varying fastest."""
    grid = sweep_values(entries)
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def same_grid(a, b) -> bool:
    """Whether two ``--sweep`` values describe the same grid (``0,3`` and ``0.0,3.0`` do)."""
    return sweep_values(a) == sweep_values(b)


def run_members(config) -> list[tuple[object, int]]:
    """Each member of a run: its config (the run's, with its setting of ``--sweep``) and its seed, setting-major."""
    seeds = [config.seed + k for k in range(getattr(config, "num_seeds", 1))]
    return [(replace(config, **setting), seed) for setting in sweep_grid(getattr(config, "sweep", None))
            for seed in seeds]


def saved_member_seeds(saved: dict) -> list[int]:
    """Each member's seed, from a saved run: a checkpoint's ``config`` (``sweep`` the flag's entries) or its
    ``summary.json`` (``sweep`` the results, which list the members)."""
    if isinstance(saved.get("sweep"), dict):
        return [member["seed"] for member in saved["sweep"]["members"]]
    seeds = [saved.get("seed", 0) + k for k in range(saved.get("num_seeds", 1))]
    return [seed for _ in sweep_grid(saved.get("sweep")) for seed in seeds]


def member_settings(config) -> list[dict[str, float]]:
    """Each member's β and τ, in member order."""
    return [{name: getattr(member, name) for name in SWEEPABLE} for member, _ in run_members(config)]


def setting_label(setting: dict) -> str:
    """``β 3, τ 0.7``."""
    return ", ".join(f"{SWEEPABLE[name][2]} {value:g}" for name, value in setting.items())


def sweep_results(curve: list[dict], config) -> dict:
    """A sweep's results from its learning curve (whose points list every member's evaluation, ``per_seed``):
    the grid, each member's final and best score, and each setting's mean ± std of both over its seeds."""
    key = "normalized_score" if all(m.get("normalized_score") is not None for p in curve for m in p["per_seed"]) \
        else "return_mean"
    members = []
    for index, (setting, (_, seed)) in enumerate(zip(member_settings(config), run_members(config))):
        scores = [(point["per_seed"][index][key], point["step"]) for point in curve]
        best, best_step = max(scores, key=lambda score: score[0])
        members.append({"member": index, "seed": seed, **setting, "final": scores[-1][0], "best": best,
                        "best_step": best_step})
    settings = []
    for setting in member_settings(config)[::getattr(config, "num_seeds", 1)]:
        own = [m for m in members if all(m[name] == value for name, value in setting.items())]
        settings.append({**setting, "label": setting_label(setting), "seeds": [m["seed"] for m in own],
                         **mean_std("final", [m["final"] for m in own]), **mean_std("best", [m["best"] for m in own])})
    return {"grid": {name: list(values) for name, values in sweep_values(config.sweep).items()}, "score": key,
            "settings": settings, "members": members}


def mean_std(name: str, values: list[float]) -> dict:
    """``{name}_mean`` and ``{name}_std`` (population std) of ``values``: how a setting's seeds are reported."""
    return {f"{name}_mean": statistics.fmean(values), f"{name}_std": statistics.pstdev(values)}
