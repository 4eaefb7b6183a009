"""The README's example and the scripts in examples/ run as written."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_readme_example_runs_and_steps_the_networks():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- readme-example -->\s*```python\n(.*?)```", readme, re.S).group(1)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    loss = scope["loss"]
    assert all(torch.isfinite(scope["out"][k]) for k in ("loss_value", "loss_qvalue", "loss_actor"))
    stepped = scope["optimizer"].state  # Adam keeps a state for every parameter it stepped
    assert len(stepped) == len(list(loss.parameters())) and all(s["step"] == 1 for s in stepped.values())


def test_custom_actor_example_trains():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "custom_actor.py")], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "loss_actor" in result.stdout


# ------------------------------------------------------------------ the main job's console, as a new user sees it
@pytest.fixture(scope="module")
def main_job(tiny_datasets_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("console") / "run"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "iql_offline.py"), "--steps", "20", "--batch-size", "32",
         "--eval-every", "10", "--eval-episodes", "2", "--hidden-sizes", "16", "16", "--device", "cpu",
         "--no-progress", "--output-dir", str(out)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "MINARI_DATASETS_PATH": str(tiny_datasets_root)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result, out


def test_the_main_job_ends_with_a_short_human_summary_and_keeps_the_json_in_the_run_folder(main_job):
    result, out = main_job
    summary = json.loads((out / "summary.json").read_text())
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "IQL on iql_torchrl/pendulum/mixed-v0, seed 0, 20 updates"
    assert f"normalized score: {summary['normalized_score']:.1f}" in result.stdout
    assert f"{summary['updates_per_second']:.1f} updates/s" in result.stdout
    assert lines[-1].strip().startswith(f"run folder: {out}") and "learning_curve.png" in lines[-1]
    assert "{" not in result.stdout and len(lines) <= 6  # no raw JSON dump


def test_the_main_job_shows_no_library_log_lines(main_job):
    result, _ = main_job
    assert "[torchrl][INFO]" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_the_main_job_shows_no_warning_about_the_target_update_it_owns(main_job):
    result, _ = main_job
    assert "No target network updater" not in result.stderr
