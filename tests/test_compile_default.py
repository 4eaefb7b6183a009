"""--compile auto, the default: the step compiles where it can be compiled and the run repays it."""
from __future__ import annotations

import json

import pytest
import torch

from iql_torchrl.runs.config import parse_cli
from iql_torchrl.jobs.finetune import FinetuneConfig
from iql_torchrl.runs.settings import COMPILE_BREAK_EVEN, auto_compile
from iql_offline import train
from iql_torchrl.runs.config import OfflineConfig


@pytest.mark.parametrize("argv,expected", [
    ([], "auto"), (["--compile"], True), (["--no-compile"], False), (["--compile", "auto"], "auto"),
    (["--compile", "--steps", "5"], True), (["--compile=False"], False),
])
def test_bare_flags_force_the_choice_and_auto_is_the_default(argv, expected):
    config, given = parse_cli(OfflineConfig, argv)
    assert config.compile == expected
    assert ("compile" in given) == bool(argv)


def test_auto_compiles_long_runs_only():
    short, long = OfflineConfig(steps=COMPILE_BREAK_EVEN - 1), OfflineConfig(steps=COMPILE_BREAK_EVEN)
    assert auto_compile(short)[0] is False and "fewer than" in auto_compile(short)[1]
    assert auto_compile(long)[0] is True
    # fine-tuning counts its offline and online updates (utd 1: one update an env step)
    tune = FinetuneConfig(offline_steps=1_000, online_steps=4_000, frames_per_batch=200)
    assert tune.total_updates() == 5_000 and auto_compile(tune)[0] is True
    assert FinetuneConfig(offline_steps=1_000, online_steps=4_000, utd_ratio=0.5).total_updates() == 3_000


def test_auto_stays_eager_under_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    compiled, why = auto_compile(OfflineConfig(steps=10 * COMPILE_BREAK_EVEN))
    assert compiled is False and "torchrun" in why


def test_auto_stays_eager_without_a_cpp_compiler(tmp_path):
    with torch._inductor.config.patch({"cpp.cxx": (None, str(tmp_path / "no-such-g++"))}):
        compiled, why = auto_compile(OfflineConfig(steps=10 * COMPILE_BREAK_EVEN, device="cpu"))
    assert compiled is False and "C++ compiler" in why


def test_the_job_says_which_step_it_runs_and_keeps_the_choice(tiny_datasets, tmp_path, capsys):
    out = tmp_path / "run"
    train(OfflineConfig(dataset=tiny_datasets.pendulum, output_dir=out, steps=4, eval_every=4, eval_episodes=1,
                 hidden_sizes=(8,), batch_size=16, logger="none", progress=False, log_every=2))
    assert "the update step runs eager: 4 updates are fewer than" in capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text())["mode"] == "eager"
