"""What a finished run shows: the learning-curve PNG and a short summary for the console (a sweep's: one
curve and one table row per setting).

The full record stays in the run folder's ``summary.json``; the console gets what a reader acts
on: the score, the return, the speed, the wall time and where the files are.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["plot_curve", "plot_sweep_curves", "console_summary", "sweep_table"]


def plot_curve(curve: list[dict], path: Path, title: str, phase_boundary: int | None = None) -> None:
    """Normalized score (or, without usable reference scores, the return) against updates.

    ``phase_boundary`` (an update count) draws a vertical line where online fine-tuning starts.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = all(p.get("normalized_score") is not None for p in curve)
    key = "normalized_score" if scored else "return_mean"
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot([p["step"] for p in curve], [p[key] for p in curve], marker="o", label="IQL")
    if scored:
        ax.axhline(100, color="tab:green", ls="--", lw=1, label="expert (100)")
        ax.axhline(0, color="tab:red", ls="--", lw=1, label="random (0)")
    if phase_boundary is not None:
        ax.axvline(phase_boundary, color="black", ls=":", lw=1.5, label="offline | online")
    ax.set_xlabel("updates")
    ax.set_ylabel("normalized score" if scored else "return")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    if all(p.get("success_rate") is not None for p in curve):  # goal-reaching tasks: success rate on its own axis
        rates = ax.twinx()
        rates.plot([p["step"] for p in curve], [100 * p["success_rate"] for p in curve], color="tab:purple",
                   ls="--", marker=".", label="success rate (%)")
        # on the score's scale where there is one: 100% success level with the expert's 100, 0% with random's 0
        rates.set_ylim(ax.get_ylim() if scored else (-5, 105))
        rates.set_yticks(range(0, 101, 20))
        rates.set_ylabel("success rate (%)")
        rates.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_sweep_curves(curve: list[dict], sweep: dict, path: Path, title: str) -> None:
    """A sweep's scores against updates: one line per setting, the mean over its seeds, shaded ± std
    (``sweep``: :func:`~iql_torchrl.runs.sweep.sweep_results`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    key = sweep["score"]
    steps = [p["step"] for p in curve]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for setting in sweep["settings"]:
        members = [m["member"] for m in sweep["members"] if all(m[n] == setting[n] for n in sweep["grid"])]
        scores = np.array([[p["per_seed"][m][key] for m in members] for p in curve])
        mean, std = scores.mean(axis=1), scores.std(axis=1)
        line, = ax.plot(steps, mean, marker="o", ms=3, label=setting["label"])
        if len(members) > 1:
            ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    if key == "normalized_score":
        ax.axhline(100, color="gray", ls="--", lw=1)
        ax.axhline(0, color="gray", ls=":", lw=1)
    ax.set_xlabel("updates")
    ax.set_ylabel("normalized score" if key == "normalized_score" else "return")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def sweep_table(sweep: dict) -> list[str]:
    """One line per setting: the mean ± std over its seeds of the final and the best evaluation."""
    width = max(len(s["label"]) for s in sweep["settings"])
    seeds = len(sweep["settings"][0]["seeds"])
    what = "normalized score" if sweep["score"] == "normalized_score" else "return"
    over = f", mean ± std over {seeds} seeds" if seeds > 1 else ""
    lines = [f"  {'setting':<{width}}  {'final':>15}  {'best':>15}   ({what}{over})"]
    for s in sweep["settings"]:
        final, best = f"{s['final_mean']:.1f} ± {s['final_std']:.1f}", f"{s['best_mean']:.1f} ± {s['best_std']:.1f}"
        lines.append(f"  {s['label']:<{width}}  {final:>15}  {best:>15}")
    return lines


def console_summary(summary: dict, run_dir: Path) -> str:
    """A few lines for the end of a run: score, return, updates/s, wall time, the run folder and plot."""
    lines = [f"IQL on {summary['dataset']}, {_seeds(summary)}, {summary.get('updates', summary.get('steps'))} updates"]
    if summary.get("offline_normalized_score") is not None:
        lines.append(f"  normalized score after the offline phase: {summary['offline_normalized_score']:.1f}")
    score = summary.get("normalized_score")
    std = summary.get("normalized_score_std")
    sweep = bool(summary.get("sweep"))  # one row per setting; its members' returns and successes pooled would mix them
    if sweep:
        lines += sweep_table(summary["sweep"])
    elif score is not None:
        spread = f" ± {std:.1f} over seeds" if std and summary.get("num_seeds", 1) > 1 else ""
        lines.append(f"  normalized score: {score:.1f}{spread} (0 random, 100 expert)")
    if summary.get("success_rate") is not None and not sweep:
        lines.append(f"  success rate: {summary['success_rate']:.0%} of {_episodes(summary)}")
    if summary.get("preset_reason"):
        lines.append(f"  preset {summary.get('preset')}: {summary['preset_reason']}")
    if not sweep:
        lines.append(f"  return: {summary['return_mean']:.1f} ± {summary['return_std']:.1f} over {_episodes(summary)}")
    rate = summary.get("updates_per_second")
    speed = f"{rate:.1f} updates/s" if rate else "updates/s not measured"
    if rate and sweep:
        speed += f" (each updates all {len(summary['sweep']['members'])} members)"
    if (compilations := summary.get("compilations") or 0) > 1:  # the first is timed apart, the later ones are not
        speed += f" (the update step compiled {compilations} times; the rate includes all but the first)"
    lines.append(f"  {speed}, wall time {_duration(summary['wall_seconds'])}")
    lines.append(f"  run folder: {run_dir} (summary.json, learning_curve.png, checkpoint.pt)")
    return "\n".join(lines)


def _seeds(summary: dict) -> str:
    k = summary.get("num_seeds", 1)
    seeds = f"seed {summary['seed']}" if k == 1 else f"seeds {summary['seed']}–{summary['seed'] + k - 1}"
    if summary.get("sweep"):
        return f"{len(summary['sweep']['settings'])} settings × {seeds}"
    return seeds


def _episodes(summary: dict) -> str:
    """The final evaluation's episodes: ``10 evaluation episodes``, ``3 seeds × 10 evaluation episodes``."""
    n, k = summary["eval_episodes"], summary.get("num_seeds", 1)
    episodes = f"{n} evaluation episode{'s' if n != 1 else ''}"
    return episodes if k == 1 else f"{k} seeds × {episodes}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m {seconds:02d}s" if hours else f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s"
