"""Ctrl-C: a run stops after the update in progress, checkpointed there, says how to continue and exits
with status 130; a second Ctrl-C stops at once; the resumed run ends like an uninterrupted one."""
import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from iql_offline import train
from iql_torchrl.jobs.finetune import FinetuneConfig, finetune
from iql_torchrl.runs.checkpoint import CHECKPOINT_NAME, load_checkpoint
from iql_torchrl.runs.config import OfflineConfig
from iql_torchrl.runs.interrupt import RunInterrupted, StopRequest
from iql_torchrl.step.update import IQLUpdate

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(steps=20, batch_size=32, eval_every=10, eval_episodes=1, log_every=5, checkpoint_every=10,
            hidden_sizes=(16, 16), device="cpu", progress=False, logger="none")
TINY_FINETUNE = dict(offline_steps=20, online_steps=96, num_envs=2, frames_per_batch=16, batch_size=32, eval_every=40,
                     eval_episodes=2, log_every=16, checkpoint_every=32, hidden_sizes=(16, 16), device="cpu",
                     progress=False, logger="none")


@pytest.fixture(autouse=True)
def python_s_ctrl_c_handler():
    """Python's own SIGINT handler, as in a foreground terminal, even where the tests were started with SIGINT
    ignored (``pytest ... &`` in a non-interactive shell: Python then keeps the signal ignored)."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        yield
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    else:
        yield


@pytest.fixture
def ctrl_c_during_update(monkeypatch):
    """``ctrl_c_during_update(k)``: SIGINT arrives while the k-th update call from here on runs;
    ``ctrl_c_during_update(None)``: no more."""
    real = IQLUpdate.__call__

    def arm(k: int | None) -> None:
        if k is None:
            monkeypatch.setattr(IQLUpdate, "__call__", real)
            return
        calls = 0

        def call(self, batch_or_indices):
            nonlocal calls
            calls += 1
            if calls == k:
                signal.raise_signal(signal.SIGINT)  # Python's handler would raise KeyboardInterrupt right here
            return real(self, batch_or_indices)

        monkeypatch.setattr(IQLUpdate, "__call__", call)

    return arm


def _stopped(job, config) -> BaseException | None:
    """What ended ``job(config)``: a KeyboardInterrupt is caught here so that it fails this test, not the session."""
    try:
        job(config)
    except BaseException as err:
        return err
    return None


def _same_parameters(a: Path, b: Path) -> None:
    first, second = load_checkpoint(a / CHECKPOINT_NAME), load_checkpoint(b / CHECKPOINT_NAME)
    assert first["step"] == second["step"]
    for key in first["loss"]:
        assert torch.equal(first["loss"][key], second["loss"][key]), key


# ------------------------------------------------------------------ the request
def test_the_first_ctrl_c_is_a_request_and_the_second_stops_at_once():
    request = StopRequest()
    request.listen()
    try:
        signal.raise_signal(signal.SIGINT)
        assert request.requested
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        request.listen()  # asked already: a later loop does not take Ctrl-C again
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        request.stop_listening()


def test_sigterm_is_a_request_too_and_puts_both_handlers_back():
    request = StopRequest()
    request.listen()
    try:
        signal.raise_signal(signal.SIGTERM)  # a scheduler's notice: SIGTERM's default would end the process here
        assert request.requested
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # a second one ends the process at once
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        request.stop_listening()


def test_the_request_puts_python_s_handler_back_and_changes_nothing_it_does_not_own():
    request = StopRequest()
    request.listen()
    assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    request.stop_listening()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler and not request.requested

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # e.g. a job started in the background
    try:
        request.listen()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)

    seen = []
    thread = threading.Thread(target=lambda: (request.listen(), seen.append(signal.getsignal(signal.SIGINT))))
    thread.start()
    thread.join()
    assert seen == [signal.default_int_handler]  # only the main thread may set handlers


# ------------------------------------------------------------------ the jobs
def test_ctrl_c_mid_update_stops_after_that_update_and_the_resumed_run_ends_like_an_uninterrupted_one(
        tiny_datasets, tmp_path, ctrl_c_during_update, capsys):
    straight = train(OfflineConfig(dataset=tiny_datasets.pendulum, output_dir=tmp_path / "straight", expectile=0.6, **TINY))
    out = tmp_path / "interrupted"
    ctrl_c_during_update(7)
    stopped = _stopped(train, OfflineConfig(dataset=tiny_datasets.pendulum, output_dir=out, expectile=0.6, **TINY))
    assert isinstance(stopped, RunInterrupted) and isinstance(stopped, KeyboardInterrupt), repr(stopped)
    assert stopped.step == 7
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    assert load_checkpoint(out / CHECKPOINT_NAME)["step"] == 7  # the update in progress, completed
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert said == ("interrupted at update 7 (checkpoint written): continue with "
                    f"python examples/iql_offline.py --resume --output-dir {out}")

    ctrl_c_during_update(None)
    resumed = train(OfflineConfig(output_dir=out, resume=True, progress=False))
    err = capsys.readouterr().err
    assert f"{out}: resuming from update 7." in err
    assert "expectile 0.6 (the checkpoint's; the preset's 0.7)" in err  # no --expectile on the resume command
    assert resumed["curve"] == straight["curve"]
    _same_parameters(tmp_path / "straight", out)


def test_fine_tuning_stops_the_same_way_and_a_ctrl_c_on_a_loop_s_last_update_stops_the_next_loop(
        tiny_datasets, tmp_path, ctrl_c_during_update, capsys):
    straight = finetune(FinetuneConfig(dataset=tiny_datasets.pendulum, output_dir=tmp_path / "straight", **TINY_FINETUNE))
    out = tmp_path / "interrupted"
    ctrl_c_during_update(20)  # the offline phase's last update: the online phase stops after its first collection
    stopped = _stopped(finetune, FinetuneConfig(dataset=tiny_datasets.pendulum, output_dir=out, **TINY_FINETUNE))
    assert isinstance(stopped, RunInterrupted) and stopped.step == 36, repr(stopped)
    state = load_checkpoint(out / CHECKPOINT_NAME)
    assert (state["step"], state["phase"], state["env_steps"]) == (36, "online", 16)
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        f"continue with python examples/iql_finetune.py --resume --output-dir {out}")

    ctrl_c_during_update(None)
    resumed = finetune(FinetuneConfig(output_dir=out, resume=True, progress=False))
    assert resumed["curve"] == straight["curve"] and resumed["updates"] == straight["updates"] == 116
    _same_parameters(tmp_path / "straight", out)


# ------------------------------------------------------------------ the command line
def _example(*args):
    # a job started from a terminal: SIGINT not ignored, whatever the tests inherited
    return subprocess.Popen([sys.executable, str(ROOT / "examples" / "iql_offline.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_on_the_command_line_exits_130_with_one_line_and_resumes_to_the_uninterrupted_run(
        signum, tiny_datasets, tmp_path):
    flags = ["--dataset", tiny_datasets.pendulum, "--steps", "600", "--batch-size", "32", "--eval-every", "200",
             "--eval-episodes", "1", "--checkpoint-every", "50", "--log-every", "50", "--hidden-sizes", "16", "16",
             "--device", "cpu", "--logger", "none", "--threads", "1"]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    reference = _example(*flags, "--output-dir", str(straight))
    victim = _example(*flags, "--output-dir", str(interrupted))
    deadline = time.time() + 240
    while time.time() < deadline:  # training has begun: its first checkpoint is there
        path = interrupted / CHECKPOINT_NAME
        if path.exists() and load_checkpoint(path)["step"] >= 50:
            break
        time.sleep(0.05)
    victim.send_signal(signum)
    _, err = victim.communicate(timeout=120)
    assert victim.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    said = err.strip().splitlines()[-1]  # the last line: no progress bar after it
    match = re.fullmatch(r"interrupted at update (\d+) \(checkpoint written\): continue with "
                         r"python examples/iql_offline\.py --resume --output-dir (.+)", said)
    assert match and match[2] == str(interrupted), said
    stopped_at = int(match[1])
    assert load_checkpoint(interrupted / CHECKPOINT_NAME)["step"] == stopped_at and 50 <= stopped_at < 600

    resumed = _example("--resume", "--output-dir", str(interrupted), "--no-progress", "--threads", "1")
    for proc in (reference, resumed):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    assert f"resuming from update {stopped_at}." in err
    _same_parameters(straight, interrupted)
    curves = [json.loads((folder / "summary.json").read_text())["curve"] for folder in (straight, interrupted)]
    assert curves[0] == curves[1] and [p["step"] for p in curves[0]] == [200, 400, 600]
