"""--compile auto, the default: the step compiles where it can be compiled and the run repays it."""
from __future__ import annotations

import json

import pytest
import torch

from iql_torchrl.runs.checkpoint import CHECKPOINT_NAME, load_checkpoint
from iql_torchrl.runs.config import parse_cli
from iql_torchrl.jobs.finetune import FinetuneConfig
from iql_torchrl.runs.settings import COMPILE_BREAK_EVEN, auto_compile, resolve_settings
from iql_offline import train
from iql_torchrl.runs.config import ConfigError, OfflineConfig


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


@pytest.mark.parametrize("argv, cudagraphs, chosen", [
    ([], True, True),  # the default on CUDA: compiled and replayed as a CUDA graph; a failed check continues eager
    (["--no-cudagraphs"], False, True),
    (["--compile"], True, False),  # forced: a failed check stops the run
    (["--cudagraphs"], True, False),
    (["--no-compile"], False, False),
])
def test_on_cuda_the_default_step_is_the_cuda_graph_step_and_a_forced_one_is_never_replaced(
        argv, cudagraphs, chosen, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    config, given = parse_cli(OfflineConfig, ["--device", "cuda", "--steps", str(2 * COMPILE_BREAK_EVEN), *argv])
    resolved, _ = resolve_settings(config, "offline", given)
    assert resolved.cudagraphs is cudagraphs
    assert resolved.step_chosen is chosen
    if not argv:
        line = capsys.readouterr().err
        assert "runs compiled" in line and "replayed as a CUDA graph" in line and "checked against the eager step" in line


@pytest.mark.parametrize("argv, cudagraphs", [([], True), (["--no-cudagraphs"], False)])
def test_a_compiled_cpu_run_resumed_on_cuda_takes_cuda_s_default_step_unless_told_otherwise(
        argv, cudagraphs, tiny_datasets, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    train(OfflineConfig(dataset=tiny_datasets.pendulum, output_dir=out, steps=4, eval_every=4, eval_episodes=1,
                        hidden_sizes=(8,), batch_size=16, logger="none", progress=False, log_every=2))
    state = load_checkpoint(out / CHECKPOINT_NAME)
    state["config"].update(compile=True, cudagraphs=False)  # as a compiled run saves it on the CPU
    torch.save(state, out / CHECKPOINT_NAME)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    capsys.readouterr()
    config, given = parse_cli(OfflineConfig, ["--resume", "--output-dir", str(out), "--device", "cuda", *argv])
    resolved, _ = resolve_settings(config, "offline", given)
    assert resolved.compile is True and resolved.cudagraphs is cudagraphs
    said = "the run's step ran on cpu; on cuda it goes on replayed as a CUDA graph" in capsys.readouterr().err
    assert said is cudagraphs  # a flag given is taken as it is, quietly


def test_on_the_cpu_auto_means_no_cuda_graphs_and_a_forced_one_is_refused(monkeypatch):
    config, given = parse_cli(OfflineConfig, ["--device", "cpu", "--steps", str(2 * COMPILE_BREAK_EVEN)])
    resolved, _ = resolve_settings(config, "offline", given)
    assert resolved.cudagraphs is False and resolved.step_chosen is True
    config, given = parse_cli(OfflineConfig, ["--device", "cpu", "--cudagraphs"])
    with pytest.raises(ConfigError, match="--cudagraphs needs CUDA"):
        resolve_settings(config, "offline", given)
