"""What a finished run shows: the learning-curve PNG and a short summary for the console.

The full record stays in the run folder's ``summary.json``; the console gets what a reader acts
on: the score, the return, the speed, the wall time and where the files are.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["plot_curve", "console_summary"]


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


def console_summary(summary: dict, run_dir: Path) -> str:
    """A few lines for the end of a run: score, return, updates/s, wall time, the run folder and plot."""
    lines = [f"IQL on {summary['dataset']}, {_seeds(summary)}, {summary.get('updates', summary.get('steps'))} updates"]
    if summary.get("offline_normalized_score") is not None:
        lines.append(f"  normalized score after the offline phase: {summary['offline_normalized_score']:.1f}")
    score = summary.get("normalized_score")
    std = summary.get("normalized_score_std")
    if score is not None:
        spread = f" ± {std:.1f} over seeds" if std and summary.get("num_seeds", 1) > 1 else ""
        lines.append(f"  normalized score: {score:.1f}{spread} (0 random, 100 expert)")
    if summary.get("success_rate") is not None:
        lines.append(f"  success rate: {summary['success_rate']:.0%} of {_episodes(summary)}")
    if summary.get("preset_reason"):
        lines.append(f"  preset {summary.get('preset')}: {summary['preset_reason']}")
    lines.append(f"  return: {summary['return_mean']:.1f} ± {summary['return_std']:.1f} over {_episodes(summary)}")
    rate = summary.get("updates_per_second")
    speed = f"{rate:.1f} updates/s" if rate else "updates/s not measured"
    lines.append(f"  {speed}, wall time {_duration(summary['wall_seconds'])}")
    lines.append(f"  run folder: {run_dir} (summary.json, learning_curve.png, checkpoint.pt)")
    return "\n".join(lines)


def _seeds(summary: dict) -> str:
    k = summary.get("num_seeds", 1)
    return f"seed {summary['seed']}" if k == 1 else f"seeds {summary['seed']}–{summary['seed'] + k - 1}"


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
