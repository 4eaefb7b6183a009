"""The run harness: one process per run folder, checked resumes, safe checkpoints, settings checked
before any work, nothing lost when an evaluation fails, timing summed over resumes."""
import json
import math
import os
import random
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from iql_torchrl.runs.checkpoint import CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME, CheckpointError, load_checkpoint, load_run_checkpoint
from iql_torchrl.runs.config import ConfigError, given_fields
from iql_torchrl.jobs.finetune import FinetuneConfig, finetune
from iql_torchrl.runs.resume import ResumeError
from iql_torchrl.runs.loggers import EVALUATION_KEYS
from iql_torchrl.runs.run import Run
from iql_torchrl.runs.folder import LOCK_NAME, FolderInUseError, RunFolder, default_run_dir
from iql_torchrl.runs.builders import load_actor
from iql_offline import train
from iql_torchrl.runs.config import OfflineConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(steps=20, batch_size=32, eval_every=10, eval_episodes=1, log_every=5, checkpoint_every=10,
            hidden_sizes=(16, 16), device="cpu", progress=False, logger="none")


def _files(folder: Path) -> dict:
    return {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def _evaluation_fails_at(monkeypatch, step: int):
    real = Run.evaluate

    def evaluate(self):
        if self.step == step:
            raise RuntimeError("evaluation failed")
        return real(self)

    monkeypatch.setattr(Run, "evaluate", evaluate)
    return real


# ------------------------------------------------------------------ one process per run folder
def test_a_second_run_on_a_folder_in_use_stops_at_once_and_writes_nothing(tiny_datasets, tmp_path):
    out = tmp_path / "run"
    with RunFolder.create(out):
        with pytest.raises(FolderInUseError, match="in use by another run"):
            train(OfflineConfig(dataset=tiny_datasets.pendulum, output_dir=out, **TINY))
        with pytest.raises(FolderInUseError, match="in use by another run"):
            train(OfflineConfig(output_dir=out, resume=True, progress=False))
        assert [p.name for p in out.iterdir()] == [LOCK_NAME]


@pytest.mark.slow
def test_the_command_line_exits_non_zero_on_a_folder_in_use(tmp_path):
    out = tmp_path / "run"
    with RunFolder.create(out):
        result = subprocess.run([sys.executable, str(ROOT / "examples" / "iql_offline.py"), "--output-dir", str(out)],
                                capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "in use by another run" in result.stderr and "Traceback" not in result.stderr
    assert [p.name for p in out.iterdir()] == [LOCK_NAME]  # stopped before any work


def test_a_killed_owner_leaves_no_stale_lock_and_the_lock_file_does_not_make_a_folder_busy(tmp_path):
    out = tmp_path / "run"
    owner = subprocess.Popen([sys.executable, "-c", "import time; from filelock import FileLock; "
                              f"lock = FileLock({str(out / LOCK_NAME)!r}, timeout=0); lock.acquire(); "
                              "print('locked', flush=True); time.sleep(600)"],
                             stdout=subprocess.PIPE, text=True)
    out.mkdir()
    assert owner.stdout.readline().strip() == "locked"
    with pytest.raises(FolderInUseError):
        RunFolder.create(out)
    owner.kill()  # SIGKILL: the kernel releases the lock
    owner.wait()
    with RunFolder.create(out) as folder:  # only the lock file is there: an empty folder
        assert folder.path == out


def test_default_run_folders_differ_for_runs_started_in_the_same_second():
    names = {default_run_dir("iql_torchrl/pendulum/mixed-v0", 0) for _ in range(20)}
    assert len(names) == 20


def _start_fails_at(monkeypatch, where: str, error: BaseException) -> None:
    import iql_torchrl.runs.run as run_module

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(run_module, where, fail)


@pytest.mark.parametrize("where, error", [
    ("load_run_data", FileNotFoundError("the dataset is missing")),  # or a reward transform refusing the data …
    ("make_logger", ImportError("the logger's package is missing")),
    ("load_run_data", KeyboardInterrupt()),  # Ctrl-C before training
])
def test_a_run_that_fails_before_writing_anything_leaves_no_folder_behind(tiny_datasets, tmp_path, monkeypatch, where,
                                                                          error):
    _start_fails_at(monkeypatch, where, error)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(type(error)):
        train(OfflineConfig(dataset=tiny_datasets.pendulum, **TINY))  # runs/<name>, and runs/ itself, made here
    with pytest.raises(type(error)):
        train(OfflineConfig(dataset=tiny_datasets.pendulum, output_dir=tmp_path / "new" / "run", **TINY))
    assert list(tmp_path.iterdir()) == []


def test_a_failed_start_keeps_a_folder_that_was_there_before_or_that_holds_anything_else(tiny_datasets, tmp_path,
                                                                                         monkeypatch):
    _start_fails_at(monkeypatch, "load_run_data", FileNotFoundError("the dataset is missing"))
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(FileNotFoundError):
        train(OfflineConfig(dataset=tiny_datasets.pendulum, output_dir=existing, **TINY))
    assert existing.is_dir()

    out = tmp_path / "made" / "run"
    folder = RunFolder.create(out)
    (out / "notes.txt").write_text("mine")  # written in the meantime
    folder.release(failed=True)
    assert (out / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------ settings checked before any work
@pytest.mark.parametrize("field, value, flag", [
    ("tau", 2.0, "--tau"), ("gamma", 5.0, "--gamma"), ("hidden_sizes", (0,), "--hidden-sizes"),
    ("hidden_sizes", (), "--hidden-sizes"), ("temperature", math.inf, "--temperature"),
    ("temperature", math.nan, "--temperature"), ("temperature", -1.0, "--temperature"),
    ("expectile", 1.0, "--expectile"), ("log_every", 0, "--log-every"), ("checkpoint_every", 0, "--checkpoint-every"),
    ("eval_every", 0, "--eval-every"), ("eval_episodes", 0, "--eval-episodes"), ("batch_size", 0, "--batch-size"),
    ("steps", 0, "--steps"), ("num_seeds", 0, "--num-seeds"), ("lr", 0.0, "--lr"), ("lr", math.nan, "--lr"),
    ("actor_lr", -1e-3, "--actor-lr"), ("weight_decay", -0.1, "--weight-decay"), ("threads", 0, "--threads"),
])
def test_an_invalid_setting_is_refused_by_its_flag_before_anything_is_written(tmp_path, field, value, flag):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=rf"^{flag} .*must be"):
        train(OfflineConfig(output_dir=out, **{**TINY, field: value}))
    assert not out.exists()


@pytest.mark.parametrize("field, value, flag", [
    ("online_fraction", 1.0, "--online-fraction"), ("offline_steps", -1, "--offline-steps"),
    ("online_steps", 0, "--online-steps"), ("frames_per_batch", 15, "--frames-per-batch"), ("tau", 0.0, "--tau"),
])
def test_an_invalid_fine_tuning_setting_is_refused_by_its_flag(tmp_path, field, value, flag):
    with pytest.raises(ConfigError, match=flag):
        finetune(FinetuneConfig(output_dir=tmp_path / "run", **{field: value}))
    assert not (tmp_path / "run").exists()


def test_an_output_folder_that_cannot_be_written_is_refused_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match="choose a writable --output-dir"):
        train(OfflineConfig(output_dir=blocker / "run", **TINY))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_fails_before_training_even_without_a_logger(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    out.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="Cannot write in the run folder"):
            train(OfflineConfig(output_dir=out, **TINY))
    finally:
        out.chmod(0o700)


def test_an_environment_that_cannot_be_created_is_refused_before_training(tiny_datasets, tmp_path, monkeypatch):
    from iql_torchrl.data import OfflineDataMetadata
    from iql_torchrl.runs.evaluation import EvaluationEnvError

    def missing_module(self, **kwargs):
        raise ModuleNotFoundError("No module named 'mujoco'")

    monkeypatch.setattr(OfflineDataMetadata, "make_env", missing_module)
    out = tmp_path / "run"
    with pytest.raises(EvaluationEnvError, match="cannot be created and reset: ModuleNotFoundError"):
        train(OfflineConfig(dataset=tiny_datasets.pendulum, output_dir=out, **TINY))
    assert not (out / CHECKPOINT_NAME).exists()


def test_unusable_reference_scores_fall_back_to_returns_with_a_warning(tiny_datasets, tmp_path, monkeypatch):
    import iql_torchrl.runs.loading as run_module

    real_load = run_module.load_minari_dataset

    def equal_references(*args, **kwargs):
        buffer = real_load(*args, **kwargs)
        buffer.metadata.ref_max_score = buffer.metadata.ref_min_score
        return buffer

    monkeypatch.setattr(run_module, "load_minari_dataset", equal_references)
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="No normalized scores .* reference scores are equal"):
        summary = train(OfflineConfig(dataset=tiny_datasets.pendulum, output_dir=out, **TINY))
    assert summary["normalized_score"] is None and math.isfinite(summary["return_mean"])
    assert all(p["normalized_score"] is None for p in summary["curve"])
    assert (out / "learning_curve.png").stat().st_size > 1000


# ------------------------------------------------------------------ resume checks
def test_resume_refuses_every_changed_setting_and_lists_both_values(tiny_datasets, tmp_path):
    out = tmp_path / "run"
    train(OfflineConfig(dataset=tiny_datasets.pendulum, output_dir=out, **TINY))
    before = _files(out)
    changed = dict(batch_size=64, hidden_sizes=(8,), expectile=0.9, steps=40)
    with pytest.raises(ResumeError) as err:
        train(OfflineConfig(**{**TINY, **changed, "output_dir": out, "resume": True}))
    message = str(err.value)
    for line in ("--batch-size: checkpoint 32, given 64", "--hidden-sizes: checkpoint 16 16, given 8",
                 "--expectile: checkpoint 0.7, given 0.9", "--steps: checkpoint 20, given 40"):
        assert line in message, line
    assert "--eval-episodes" not in message  # not changed
    assert _files(out) == before


def test_a_resume_goes_on_compiled_or_eager_with_or_without_a_cuda_graph_as_asked_and_says_so(capsys):
    # the way the step runs on a machine: a run moved between the CPU and a GPU may want it back
    from iql_torchrl.runs.config import config_to_dict
    from iql_torchrl.runs.resume import resumed_config

    saved = config_to_dict(OfflineConfig(dataset="iql_torchrl/pendulum/mixed-v0", output_dir="/tmp/x", compile=False,
                                         cudagraphs=False).resolved())
    again = lambda **given: OfflineConfig(dataset="iql_torchrl/pendulum/mixed-v0", output_dir="/tmp/x", resume=True,
                                          **given)
    resumed = resumed_config(OfflineConfig, saved, again(compile=True, cudagraphs=True), {"compile", "cudagraphs"})
    assert resumed.compile is True and resumed.cudagraphs is True
    said = capsys.readouterr().err
    assert "--compile: the run goes on compiled (its checkpoint's step ran eager)" in said
    assert "--cudagraphs: the run goes on replayed as a CUDA graph (its checkpoint's step ran without a CUDA graph)" in said
    resumed = resumed_config(OfflineConfig, saved, again(compile="auto", cudagraphs=False), {"compile", "cudagraphs"})
    assert resumed.compile is False and resumed.cudagraphs is False  # the checkpoint's, quietly
    assert capsys.readouterr().err == ""
    with pytest.raises(ResumeError, match="--batch-size: checkpoint 256, given 64"):  # the run's shape still may not
        resumed_config(OfflineConfig, saved, again(compile=True, batch_size=64), {"compile", "batch_size"})


def test_a_flag_given_on_the_command_line_counts_even_at_its_default_value(tiny_datasets, tmp_path):
    out = tmp_path / "run"
    train(OfflineConfig(dataset=tiny_datasets.pendulum, output_dir=out, **TINY))
    argv = ["--resume", "--output-dir", str(out), "--batch-size", "256", "--no-progress", "--eval-episodes=3"]
    config = OfflineConfig(output_dir=out, resume=True, progress=False, eval_episodes=3)  # what tyro makes of argv
    assert given_fields(config, argv) == {"resume", "output_dir", "batch_size", "progress", "eval_episodes"}
    with pytest.raises(ResumeError, match="--batch-size: checkpoint 32, given 256"):
        train(config, given_fields(config, argv))


def test_a_finished_run_says_so_and_leaves_every_file_untouched(tiny_datasets, tmp_path, capsys):
    out = tmp_path / "run"
    summary = train(OfflineConfig(dataset=tiny_datasets.pendulum, output_dir=out, **TINY))
    before = _files(out)
    again = train(OfflineConfig(output_dir=out, resume=True, progress=False, eval_episodes=5))  # a run-neutral change
    assert "this run is finished" in capsys.readouterr().err
    assert again == json.loads(json.dumps(summary))
    assert _files(out) == before


def test_a_finished_run_s_checkpoint_holds_its_whole_curve(tiny_datasets, tmp_path):
    """The checkpoint written before the last evaluation is written again after it: what reads a finished run's
    checkpoint (a study of its curve, a fine-tuning) sees the final evaluation, and no evaluation is pending."""
    out = tmp_path / "run"
    summary = train(OfflineConfig(dataset=tiny_datasets.pendulum, output_dir=out, **TINY))
    state = load_checkpoint(out / CHECKPOINT_NAME)
    assert [p["step"] for p in state["curve"]] == [10, 20]  # not [10]: the last evaluation left out
    assert state["curve"] == summary["curve"] and state["step"] == 20 and not state["evaluate_pending"]


def _crashed_run(dataset, out, monkeypatch, **overrides):
    """A run whose evaluation failed at its last step: its checkpoint (step 20) is written, the summary is not."""
    real = _evaluation_fails_at(monkeypatch, 20)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        train(OfflineConfig(dataset=dataset, output_dir=out, **{**TINY, **overrides}))
    monkeypatch.setattr(Run, "evaluate", real)


def test_resume_refuses_data_rebuilt_since_never_rebuilds_a_missing_dataset_and_goes_on_once_it_is_built_again(
        minari_root, tmp_path, monkeypatch):
    from iql_torchrl.datasets import build_dataset, dataset_exists

    dataset = "iql_torchrl/pendulum/mixed-v0"
    build_dataset(dataset, episodes=2, seed=0, reference_episodes=1, progress=False)
    out = tmp_path / "run"
    _crashed_run(dataset, out, monkeypatch)

    build_dataset(dataset, episodes=2, seed=1, reference_episodes=1, progress=False, overwrite=True)  # other data
    with pytest.raises(ResumeError, match="not the data this run trained on"):
        train(OfflineConfig(output_dir=out, resume=True, progress=False))

    import shutil

    shutil.rmtree(minari_root / dataset)
    with pytest.raises(ResumeError, match="dataset iql_torchrl/pendulum/mixed-v0 of this run is missing; restore it, or "
                       "build it again .*`python -m iql_torchrl.datasets build iql_torchrl/pendulum/mixed-v0`"):
        train(OfflineConfig(output_dir=out, resume=True, progress=False))
    assert not dataset_exists(dataset)  # not silently rebuilt
    assert not (out / "summary.json").exists()

    build_dataset(dataset, episodes=2, seed=0, reference_episodes=1, progress=False)  # as the run's set was built
    summary = train(OfflineConfig(output_dir=out, resume=True, progress=False))
    assert [point["step"] for point in summary["curve"]] == [10, 20]


def _write_again(hdf5: Path, action_nudge: float = 0.0) -> None:
    """The Minari file's arrays and attributes written again compressed (other bytes), the first action of
    episode 0 moved by ``action_nudge``."""
    import h5py

    copy = hdf5.with_suffix(".rewritten")
    with h5py.File(hdf5, "r") as source, h5py.File(copy, "w") as target:
        target.attrs.update(source.attrs)

        def write(name, item):
            if isinstance(item, h5py.Group):
                target.require_group(name).attrs.update(item.attrs)
                return
            data = item[()]
            if name == "episode_0/actions":
                data.flat[0] += action_nudge
            target.create_dataset(name, data=data, **({} if item.shape == () else dict(compression="gzip")))
            target[name].attrs.update(item.attrs)

        source.visititems(write)
    copy.replace(hdf5)


def test_resume_goes_on_on_the_same_transitions_in_other_bytes_and_refuses_one_action_moved(
        minari_root, tmp_path, monkeypatch, capsys):
    from iql_torchrl.datasets import build_dataset

    dataset = "iql_torchrl/pendulum/mixed-v0"
    build_dataset(dataset, episodes=2, seed=0, reference_episodes=1, progress=False)
    out = tmp_path / "run"
    _crashed_run(dataset, out, monkeypatch)
    hdf5 = minari_root / dataset / "data" / "main_data.hdf5"
    original = hdf5.read_bytes()

    _write_again(hdf5, action_nudge=1e-5)  # one of 400 actions moved: the observations' statistics are unchanged
    with pytest.raises(ResumeError, match=r"not the data this run trained on \(files_sha256 differ"):
        train(OfflineConfig(output_dir=out, resume=True, progress=False))

    hdf5.write_bytes(original)
    _write_again(hdf5)
    assert hdf5.read_bytes() != original
    capsys.readouterr()
    summary = train(OfflineConfig(output_dir=out, resume=True, progress=False))
    assert [point["step"] for point in summary["curve"]] == [10, 20]
    assert ("iql_torchrl: The files of iql_torchrl/pendulum/mixed-v0 are not the bytes this run trained on"
            in capsys.readouterr().err)


def test_a_failed_evaluation_loses_nothing_and_the_resumed_run_ends_like_an_uninterrupted_one(tiny_datasets, tmp_path, monkeypatch):
    straight = train(OfflineConfig(dataset=tiny_datasets.pendulum, output_dir=tmp_path / "straight", **TINY))
    out = tmp_path / "crashed"
    _crashed_run(tiny_datasets.pendulum, out, monkeypatch)
    state = load_checkpoint(out / CHECKPOINT_NAME)
    assert state["step"] == 20 and state["evaluate_pending"]  # written before the evaluation that failed
    assert not (out / "summary.json").exists()
    (out / ".checkpoint.pt.stale.tmp").write_bytes(b"left by kill -9")

    resumed = train(OfflineConfig(output_dir=out, resume=True, progress=False))
    assert not (out / ".checkpoint.pt.stale.tmp").exists()  # stale temporary files are cleaned up
    assert resumed["curve"] == straight["curve"] and [p["step"] for p in resumed["curve"]] == [10, 20]
    assert resumed["normalized_score"] == straight["normalized_score"]
    a, b = load_checkpoint(tmp_path / "straight" / CHECKPOINT_NAME), load_checkpoint(out / CHECKPOINT_NAME)
    for key in a["loss"]:
        assert torch.equal(a["loss"][key], b["loss"][key]), key
    # the resumed session ran no update: updates/s is the first session's, not 0 or None
    assert b["timing"]["timed_updates"] == 20
    assert resumed["updates_per_second"] == pytest.approx(20 / state["timing"]["train_seconds"])
    assert resumed["wall_seconds"] >= state["timing"]["wall_seconds"]


def test_updates_per_second_counts_each_update_once_across_a_resume(tiny_datasets, tmp_path, stop_after_checkpoint):
    stop_after_checkpoint(lambda run: run.step == 10)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(OfflineConfig(dataset=tiny_datasets.pendulum, output_dir=out, **TINY))
    stop_after_checkpoint(None)
    first = load_checkpoint(out / CHECKPOINT_NAME)["timing"]
    assert first["timed_updates"] == 10

    summary = train(OfflineConfig(output_dir=out, resume=True, progress=False))
    timing = load_checkpoint(out / CHECKPOINT_NAME)["timing"]
    assert timing["timed_updates"] == 20  # 10 + 10, not 10 (this session's) over both sessions' seconds
    assert timing["train_seconds"] > first["train_seconds"]
    assert summary["updates_per_second"] == pytest.approx(20 / timing["train_seconds"], rel=1e-6)
    assert summary["wall_seconds"] > first["wall_seconds"]


def _csv_rows(out: Path) -> dict[str, list[tuple[int, str]]]:
    scalars = out / "logs" / out.name / "scalars"
    return {path.stem: [(int(step), value) for step, value in (line.split(",") for line in path.read_text().split())]
            for path in sorted(scalars.glob("*.csv"))}


def _tensorboard_rows(out: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    events = EventAccumulator(str(out / "logs" / out.name), size_guidance={SCALARS: 0})  # what TensorBoard shows
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _killed_at_update_14_and_resumed(dataset, tmp_path, monkeypatch, logger: str, rows):
    """A run (checkpoint and evaluation every 10 updates, metrics logged every 2) killed at update 14 after logging it,
    then resumed: its logs before and after the resume, and an uninterrupted run's."""
    settings = {**TINY, "logger": logger, "log_every": 2}
    straight = tmp_path / "straight"
    train(OfflineConfig(dataset=dataset, output_dir=straight, **settings))
    real = Run.read_metrics

    def killed_after_logging(self, metrics, extra=None):
        values = real(self, metrics, extra)
        if self.step == 14:
            if logger == "tensorboard":
                self.logger.experiment.flush()  # what a killed process's writer had written
            raise RuntimeError("killed")
        return values

    monkeypatch.setattr(Run, "read_metrics", killed_after_logging)
    out = tmp_path / "killed"
    with pytest.raises(RuntimeError, match="killed"):
        train(OfflineConfig(dataset=dataset, output_dir=out, **settings))
    monkeypatch.setattr(Run, "read_metrics", real)
    before = rows(out)
    train(OfflineConfig(output_dir=out, resume=True, progress=False))
    return before, rows(out), rows(straight)


def test_a_run_killed_between_checkpoints_resumes_to_the_csv_logs_of_an_uninterrupted_one(tiny_datasets, tmp_path,
                                                                                          monkeypatch):
    before, after, expected = _killed_at_update_14_and_resumed(tiny_datasets.pendulum, tmp_path, monkeypatch, "csv",
                                                               _csv_rows)
    assert [step for step, _ in before["loss_value"]] == [2, 4, 6, 8, 10, 12, 14]
    assert [step for step, _ in before["normalized_score"]] == [10]  # logged after the checkpoint at 10
    assert [step for step, _ in after["loss_value"]] == list(range(2, 21, 2))  # 12 and 14 once, not twice
    assert [step for step, _ in after["normalized_score"]] == [10, 20]  # the redone evaluation once
    assert after == expected  # every metric, row for row: the resumed updates are bitwise the straight run's


def test_a_run_killed_between_checkpoints_resumes_to_the_tensorboard_logs_of_an_uninterrupted_one(
        tiny_datasets, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    before, after, expected = _killed_at_update_14_and_resumed(tiny_datasets.pendulum, tmp_path, monkeypatch,
                                                               "tensorboard", _tensorboard_rows)
    assert [step for step, _ in before["loss_value"]] == [2, 4, 6, 8, 10, 12, 14]
    assert [step for step, _ in after["loss_value"]] == list(range(2, 21, 2))  # 12 and 14 once, not twice
    assert after.keys() == expected.keys()
    for tag in expected:  # every metric as the straight run's; the redone evaluation of update 10 shows twice (the purge
        # spans every tag), at the value the straight run logged there
        twice = expected[tag][:1] if tag in EVALUATION_KEYS else []
        assert after[tag] == twice + expected[tag], tag


# ------------------------------------------------------------------ safe loading
class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_crafted_checkpoint_is_refused_without_running_its_code(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    marker = tmp_path / "code-ran"
    torch.save({"loss": _RunsCode(marker), "config": {}}, out / CHECKPOINT_NAME)
    assert pickle.loads(pickle.dumps(_RunsCode(marker))) is None and marker.exists()  # unpickled, it runs code
    marker.unlink()
    with pytest.raises(CheckpointError, match=rf"{CHECKPOINT_NAME} holds objects .*refused, not executed"):
        load_actor(out)
    with pytest.raises(CheckpointError):
        train(OfflineConfig(output_dir=out, resume=True, progress=False))
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "empty", "random"])
def test_an_unreadable_checkpoint_names_the_file_and_falls_back_to_the_previous_one(tiny_datasets, tmp_path, damage):
    out = tmp_path / "run"
    train(OfflineConfig(dataset=tiny_datasets.pendulum, output_dir=out, **TINY))
    path = out / CHECKPOINT_NAME
    previous_step = load_checkpoint(out / PREVIOUS_CHECKPOINT_NAME)["step"]
    data = path.read_bytes()
    damaged = {"truncated": [data[: len(data) // 2]], "empty": [b""],
               "random": [random.Random(seed).randbytes(4096) for seed in range(200)]}[damage]
    for payload in damaged:  # random bytes fail in many places of torch's reader: each must give the same error
        path.write_bytes(payload)
        with pytest.raises(CheckpointError, match=rf"{path} is not a readable checkpoint .* Delete it"):
            load_checkpoint(path)
    with pytest.warns(UserWarning, match=rf"Using the previous checkpoint {PREVIOUS_CHECKPOINT_NAME} \(update step {previous_step}\)"):
        state = load_run_checkpoint(out)
    assert state["step"] == previous_step
    with pytest.warns(UserWarning, match="previous checkpoint"):
        actor, _ = load_actor(out)  # evaluation and export read the same fallback
    (out / PREVIOUS_CHECKPOINT_NAME).unlink()
    with pytest.raises(CheckpointError, match=str(path)):
        load_run_checkpoint(out)


# ------------------------------------------------------------------ threads and optimiser flags
def test_threads_auto_takes_omp_num_threads_else_this_process_share_of_its_cpus(monkeypatch):
    from iql_torchrl.runs.threads import auto_threads, set_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert auto_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    assert auto_threads() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun's processes on this node share the CPUs
    assert auto_threads() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert auto_threads() == 1
    before = torch.get_num_threads()
    try:
        assert set_threads(2) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_per_network_learning_rates_optimizer_and_weight_decay_reach_the_update_step(monkeypatch):
    import iql_torchrl.runs.builders as build

    received = {}
    monkeypatch.setattr(build, "IQLUpdate", lambda loss, **kwargs: received.update(kwargs))
    config = OfflineConfig(lr=1e-3, actor_lr=1e-4, value_lr=2e-4, optimizer="adamw", weight_decay=0.01, device="cpu",
                           precision="fp32")
    build.make_update(config.resolved(), loss=None, data=None, total_steps=10)
    assert received["lr"] == 1e-3 and received["actor_lr"] == 1e-4 and received["value_lr"] == 2e-4
    assert received["optimizer"] == "adamw" and received["weight_decay"] == 0.01
    assert received.get("qvalue_lr") is None  # unset: --lr


def test_restarting_the_progress_clock_drops_the_time_before_it():
    # a compiling first update must not set the bar's rate and ETA for the rest of the run
    import io
    import time

    from tqdm import tqdm

    from iql_torchrl.runs.progress import restart_progress_clock

    bars = {}
    for restart in (True, False):
        bar = tqdm(total=100, initial=10, desc="IQL (compiling the update step)", file=io.StringIO(), mininterval=1.0)
        time.sleep(0.3)  # the first update, compiling
        if restart:
            restart_progress_clock(bar, "IQL")
        bar.update(1)
        bars[restart] = (bar.n, bar.format_dict["elapsed"], bar.desc)
        bar.close()
    n, elapsed, desc = bars[True]
    assert (n, desc) == (11, "IQL") and elapsed < 0.2
    assert bars[False][1] >= 0.3  # the wrong variant: no restart, the compilation in the rate


def test_the_bar_s_rate_and_eta_leave_out_evaluations(tmp_path, monkeypatch):
    # after an evaluation the bar counts on from where training stopped, as updates/s does
    import time
    from types import SimpleNamespace

    from iql_torchrl.runs.distributed import DistributedContext
    from iql_torchrl.runs.progress import LoopProgress
    from iql_torchrl.runs.timing import RunTiming

    config = OfflineConfig(log_every=10, checkpoint_every=10, eval_every=10, device="cpu")
    run = Run(config, "offline", DistributedContext(), None, tmp_path, None)
    monkeypatch.setattr(run, "read_metrics", lambda metrics, extra=None: None)
    monkeypatch.setattr(run, "checkpoint_and_evaluate", lambda: time.sleep(0.5))  # a half-second evaluation
    run.progress = LoopProgress(RunTiming(), SimpleNamespace(mode="eager"), total=100, initial=0, desc="IQL")
    run.progress.advance(10)
    run.step = 10
    run.after_updates(None, 9, last=False)
    elapsed = run.progress.bar.format_dict["elapsed"]
    run.progress.close()
    assert elapsed < 0.25


def test_one_cadence_for_single_updates_and_for_collections_of_updates(tmp_path):
    # the offline loop asks after every update, the online phase after each collection's updates: an
    # interval is due when its multiple was reached on the way, and a loop's last updates do everything
    from iql_torchrl.runs.distributed import DistributedContext

    config = OfflineConfig(log_every=5, checkpoint_every=10, eval_every=20, device="cpu")
    run = Run(config, "offline", DistributedContext(), None, tmp_path, None)
    due = {step: run.due(step - 1, step, last=False) for step in range(1, 41)}
    assert [s for s, (log, _, _) in due.items() if log] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert [s for s, (_, checkpoint, _) in due.items() if checkpoint] == [10, 20, 30, 40]
    assert [s for s, (_, _, evaluate) in due.items() if evaluate] == [20, 40]
    assert run.due(0, 8, last=False) == (True, False, False)  # 8 updates a collection: 5 reached
    assert run.due(8, 16, last=False) == (True, True, False)  # 10 reached
    assert run.due(16, 24, last=False) == (True, True, True)  # 20 reached
    assert run.due(24, 25, last=True) == (True, True, True)
    assert run.due(25, 26, last=False) == (False, False, False)
