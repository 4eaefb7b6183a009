"""What ``--resume`` checks before a run continues.

* The run's settings come from its checkpoint. A setting given on purpose on the resume command
  line (or in the config passed to ``train``) that differs from the checkpoint's refuses to resume,
  listing every such flag with both values (a sweep keeps its grid: ``--sweep`` with another one is
  refused) -- except the settings that do not shape the run
  (:data:`~iql_torchrl.runs.config.RUN_NEUTRAL_SETTINGS`: logger, progress bar, threads, evaluation
  episodes, log and checkpoint intervals, device), which take the new value. ``--steps`` is
  never one of those: the actor's cosine schedule depends on it. The way the step runs on a machine may be given
  again: ``--precision fp32`` or ``bf16``, ``--compile`` / ``--no-compile``, ``--cudagraphs`` / ``--no-cudagraphs``
  continue the run that way and say so (a bf16 run moved to a CPU without native bf16 would go on emulated,
  many times slower; a run moved between the CPU and a GPU may want its CUDA graph back); ``auto`` keeps the
  checkpoint's.
* The data must be the data the run trained on: the checkpoint keeps a fingerprint (dataset id,
  transition count, a SHA-256 of the dataset's files, the statistics of its observations, actions and
  rewards, the reward transform and the goal rule), and a changed or missing dataset, or one read with
  another goal rule, refuses to resume -- a builder dataset is never silently rebuilt. Files of other bytes
  that hold the same transitions (a set built again where another version of a library writes or rounds
  differently) go on when every statistic matches to :data:`SAME_DATA_TOLERANCE`, and the run says so.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import torch

from iql_torchrl.runs.config import RUN_NEUTRAL_SETTINGS, config_from_dict, config_to_dict, conflicting_flags
from iql_torchrl.runs.sweep import same_grid

__all__ = ["ResumeError", "SAME_DATA_TOLERANCE", "STEP_WAYS", "resumed_config", "dataset_files", "data_fingerprint", "check_same_data"]

# relative difference under which two fingerprints' statistics are those of the same transitions: a diverged
# episode moves a mean over the data by far more, rounding in another summation order by about 1e-14
SAME_DATA_TOLERANCE = 1e-9


# how the step runs on a machine, in words: a resume may change it (given, not auto), or fit it to the machine
# (iql_torchrl.runs.settings)
STEP_WAYS = {
    "precision": lambda value: f"in {value}",
    "compile": lambda value: "compiled" if value else "eager",
    "cudagraphs": lambda value: "replayed as a CUDA graph" if value else "without a CUDA graph",
}


class ResumeError(RuntimeError):
    """The run in the folder cannot continue as asked."""


def resumed_config(config_cls, saved: dict, given_config, given: set[str]):
    """The checkpoint's config, with the given run-neutral settings; refuses any other changed setting."""
    config = config_from_dict(config_cls, saved)
    wanted, stored = config_to_dict(given_config), config_to_dict(config)
    for name in given & set(RUN_NEUTRAL_SETTINGS):
        setattr(config, name, getattr(given_config, name))
    for name, way in STEP_WAYS.items():  # chosen for a machine, not the run's shape
        value = getattr(given_config, name, "auto")
        if name not in given or value == "auto":
            continue
        given = given - {name}
        if value != getattr(config, name):
            given_flag = f"--{name} {value}" if name == "precision" else f"--{'' if value else 'no-'}{name}"
            print(f"{given_flag}: the run goes on {way(value)} (its checkpoint's step ran "
                  f"{way(getattr(config, name))}).", file=sys.stderr)
            setattr(config, name, value)
    if "sweep" in given and same_grid(getattr(given_config, "sweep", None), saved.get("sweep")):
        given = given - {"sweep"}  # the same grid, written otherwise (0,3 and 0.0,3.0)
    changed = conflicting_flags(given - set(RUN_NEUTRAL_SETTINGS), wanted, stored, "checkpoint", _preset_default)
    if changed:
        raise ResumeError(
            "--resume continues a run with the settings in its checkpoint; these differ from it:\n"
            + "\n".join(changed)
            + "\nDrop them to continue the run as it was, or start a new run in another --output-dir."
        )
    config.resume = True
    return config


def _preset_default(name: str, value) -> bool:
    # "use the preset's value" (None) matches whatever value the checkpoint resolved it to; so do --preset auto,
    # --actor auto, --normalize-observations auto, --precision auto, --compile auto and --cudagraphs auto (a resumed
    # run keeps what it chose)
    return ((name in ("temperature", "expectile", "tau") and value is None)
            or (name in ("preset", "normalize_observations", "actor", *STEP_WAYS) and value == "auto"))


# ---------------------------------------------------------------------------------------- data fingerprint
def dataset_files(dataset_id: str) -> list[Path]:
    """The files of a local Minari dataset (empty when it is not there)."""
    from minari.storage.datasets_root_dir import get_dataset_path

    folder = get_dataset_path(dataset_id) / "data"
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


def data_fingerprint(dataset_id: str, metadata, transitions=None) -> dict:
    """What identifies the data a run trains on: id, size, a SHA-256 of the dataset's files, the statistics
    (with ``transitions``, the loaded data's TensorDict, also its actions' and rewards' means, in float64)."""
    digest = hashlib.sha256()
    files = dataset_files(dataset_id)
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return {
        "dataset": dataset_id,
        "num_transitions": metadata.num_transitions,
        "files_sha256": digest.hexdigest() if files else None,
        "observation_mean": list(metadata.observation_mean),
        "observation_std": list(metadata.observation_std),
        "reward_scale": metadata.reward_scale,
        "reward_shift": metadata.reward_shift,
        "success_terminal": metadata.success_terminal,
        **({} if transitions is None else {
            "action_mean": transitions.get("action").to(torch.float64).mean(0).reshape(-1).tolist(),
            "reward_mean": transitions.get(("next", "reward")).to(torch.float64).mean().item(),
        }),
    }


def check_same_data(saved: dict, current: dict, what: str = "this run") -> str | None:
    """Refuses (:class:`ResumeError`) when the data differ from the fingerprint ``saved``, or would be read
    with another goal rule or reward transform (a fingerprint without a goal rule read its data continuing).

    Returns a line to show when the files are other bytes holding the same transitions (every statistic both
    fingerprints hold equal to :data:`SAME_DATA_TOLERANCE`), else ``None``."""
    differences = [
        name for name in ("dataset", "num_transitions") if saved.get(name) != current.get(name)
    ] + [name for name in ("observation_mean", "observation_std") if not _close(saved.get(name), current.get(name))]
    note = None
    if not differences and saved.get("files_sha256") != current.get("files_sha256"):
        compared = [name for name in ("observation_mean", "observation_std", "reward_scale", "reward_shift",
                                      "action_mean", "reward_mean") if name in saved and name in current]
        if all(_close(saved[name], current[name], SAME_DATA_TOLERANCE, 1e-12) for name in compared):
            note = (f"The files of {current['dataset']} are not the bytes {what} trained on (built again, or written "
                    f"by another version of a library), but they hold as many transitions ({current['num_transitions']:,}) "
                    f"with the same {', '.join(compared)} (to a relative {SAME_DATA_TOLERANCE:g}): the same data.")
        else:
            differences.append("files_sha256")
    if differences:
        raise ResumeError(
            f"The dataset {current['dataset']} is not the data {what} trained on ({', '.join(differences)} differ: "
            f"it was rebuilt or replaced since). Restore the original dataset, or start a new run."
        )
    was, now = bool(saved.get("success_terminal", False)), bool(current.get("success_terminal", False))
    if was != now:
        rule = {True: "the goal terminal", False: "the goal continuing"}
        raise ResumeError(
            f"{what[0].upper()}{what[1:]} trained on {current['dataset']} with {rule[was]} (success_terminal) and would now "
            f"read it with {rule[now]}: its preset's goal rule differs from the one it started with. Start a new run "
            f"(--success-terminal / --no-success-terminal choose the rule)."
        )
    rewards = [name for name in ("reward_scale", "reward_shift") if not _close(saved.get(name), current.get(name))]
    if rewards:
        raise ResumeError(
            f"The dataset {current['dataset']} is the data {what} trained on, but its rewards would now be transformed "
            f"otherwise ({', '.join(rewards)} differ: the preset's reward transform differs from the one it started "
            f"with). Start a new run."
        )
    return note


def _close(a, b, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> bool:
    a, b = json.loads(json.dumps(a)), json.loads(json.dumps(b))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, rel_tol, abs_tol) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=rel_tol, abs_tol=abs_tol)
    return a == b
