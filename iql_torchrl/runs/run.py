"""The run harness shared by offline training and fine-tuning.

One :class:`Run` owns a run folder from start to summary:

1. settings -- checked before any work (:meth:`~iql_torchrl.runs.config.RunConfig.check`); with
   ``--resume`` they come from the checkpoint (:mod:`iql_torchrl.runs.resume` refuses changed ones);
2. the folder -- created and locked (:class:`~iql_torchrl.runs.folder.RunFolder`), stale temporary
   files removed; a finished run is reported and left untouched;
3. the data -- loaded, fingerprinted (and on resume compared with the checkpoint's), the
   evaluation environment created and reset once, the reference scores checked;
4. the loop's services -- logger, progress bar, timing summed over resumes, non-finite guard,
   checkpoints written before every evaluation, evaluation, and the summary;
5. Ctrl-C or SIGTERM -- the first stops the loop after the update in progress, checkpointed, with one line
   saying how to continue (:mod:`iql_torchrl.runs.interrupt`; single-process runs: under torchrun the
   launcher signals its processes again at once, so there Ctrl-C stops at once, as Python does);
6. a failed start -- a folder this run created and that holds nothing but its lock is removed.

A job (``examples/iql_offline.py``, :func:`iql_torchrl.jobs.finetune.finetune`) builds its networks,
loss and update step, attaches them (:meth:`Run.attach`), and runs its loop on one cadence::

    for _ in run.updates(last_step, update):   # progress bar, timing; a compiled step's warm-up kept apart
        run.after_update(update(sample()))     # counted; log, checkpoint, evaluate when due

(the online phase runs several updates per collection: :meth:`Run.run_updates`, then :meth:`Run.after_updates`).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

import iql_torchrl
from iql_torchrl.data import buffer_transitions
from iql_torchrl.datasets import discrete_actions
from iql_torchrl.runs.allocator import keep_freed_memory
from iql_torchrl.runs.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    capture_rng,
    remove_stale_temporaries,
    restore_rng,
    save_checkpoint,
)
from iql_torchrl.runs.config import (
    PRESET_FIELDS,
    ConfigError,
    config_to_dict,
    describe_preset,
    given_fields,
    normalization_choice,
    preset_choice,
)
from iql_torchrl.runs.distributed import setup_distributed
from iql_torchrl.runs.evaluation import EvaluationEnvError, evaluate_seeds
from iql_torchrl.runs.folder import FolderInUseError, RunFolder, default_run_dir
from iql_torchrl.runs.interrupt import RunInterrupted, StopRequest
from iql_torchrl.runs.loading import load_run_data
from iql_torchrl.runs.loggers import EVALUATION_KEYS, log_values, make_logger
from iql_torchrl.runs.progress import LoopProgress
from iql_torchrl.runs.report import plot_curve, plot_sweep_curves
from iql_torchrl.runs.resume import ResumeError
from iql_torchrl.runs.settings import resolve_settings
from iql_torchrl.runs.sweep import member_settings, sweep_results
from iql_torchrl.runs.threads import auto_threads, available_cpus, set_threads
from iql_torchrl.runs.timing import RunTiming
from iql_torchrl.runs.value_bound import ValueBoundWatch, return_bound
from iql_torchrl.step.update import metrics_to_floats

__all__ = ["Run", "NonFiniteLossError", "RunInterrupted", "USER_ERRORS", "SUMMARY_NAME"]

SUMMARY_NAME = "summary.json"


class NonFiniteLossError(RuntimeError):
    """A loss or parameter became NaN or inf; the last checkpoint (written before it) is intact."""


# What a command line reports as one line and a non-zero exit: bad settings or files, not bugs.
USER_ERRORS = (ConfigError, ResumeError, FolderInUseError, CheckpointError, NonFiniteLossError, EvaluationEnvError,
               FileExistsError, FileNotFoundError, PermissionError, ValueError)


class Run:
    """One run folder, from the checked settings to the summary. Build it with :meth:`begin`."""

    def __init__(self, config, job: str, ctx, folder: RunFolder | None, output_dir: Path, state: dict | None):
        self.config, self.job, self.ctx, self.folder, self.output_dir, self.state = config, job, ctx, folder, output_dir, state
        self.device = f"cuda:{ctx.local_rank}" if config.device == "cuda" and ctx.enabled else config.device
        self.finished = state is not None and (output_dir / SUMMARY_NAME).is_file()
        self.logger = None
        self.wandb_id = (state or {}).get("wandb_id")  # the W&B run this run logs to, kept across resumes
        self.step, self.curve, self.last_eval, self.last_checkpoint_step = 0, [], None, None
        self.timing = RunTiming(state.get("timing") if state else None)
        self.metadata = self.fingerprint = None
        self.last_values = {"loss_qvalue": float("nan")}
        self.progress = None  # the running loop's bar and clock
        self.stop_request = StopRequest()  # Ctrl-C or SIGTERM during a loop
        self.value_bound = ValueBoundWatch()  # the offline job's: set when its data loads

    # ------------------------------------------------------------------ start
    @classmethod
    def begin(cls, config, job: str, given: set[str] | None = None, label: str = "",
              preset_reason: str | None = None, sources: dict[str, str] | None = None) -> Run:
        """Checks the settings, locks the run folder and, with ``--resume``, reads its checkpoint.

        ``given`` names the fields set on purpose (see :func:`~iql_torchrl.runs.config.parse_cli`);
        by default, those that differ from the defaults. ``preset_reason`` says why the config's preset
        was chosen where the config alone cannot (e.g. taken from an earlier run), and ``sources`` what set
        a field that no flag set (``{"expectile": "the offline run's"}``; a resumed run's are the checkpoint's).
        A finished run comes back with ``run.finished`` set and nothing written.
        """
        given = given_fields(config) | set(given or ())
        config.check()
        if config.actor_choice() == "deterministic":  # refused before any line about the run where the data tells already
            config.check_actor(discrete_actions(config.dataset))
        preset_reason = preset_reason or preset_choice(config)[1]
        normalization_reason = (sources or {}).get("normalize_observations") or normalization_choice(config)[1]
        folder = failure = None
        if config.resume and int(os.environ.get("RANK", "0")) == 0:  # the folder's owner: lock it before reading it
            try:
                folder = RunFolder.open(config.output_dir)
            except USER_ERRORS as err:
                if int(os.environ.get("WORLD_SIZE", "1")) == 1:
                    raise
                failure = err  # under torchrun the other processes wait for process 0: they learn of it below
        try:
            config, state = resolve_settings(config, job, given)
            ctx = setup_distributed(config.device)
            set_threads(config.threads)
            keep_freed_memory()  # glibc: activation buffers stay mapped between updates (iql_torchrl.runs.allocator)
            if state is not None and state.get("world_size", 1) != ctx.world_size:
                raise ResumeError(f"This run was checkpointed with {state.get('world_size', 1)} processes; resume it with as many.")
            if ctx.is_main and failure is None:
                try:
                    if folder is None:
                        folder = RunFolder.create(config.output_dir or default_run_dir(config.dataset, config.seed, label))
                    remove_stale_temporaries(folder.path)
                except USER_ERRORS as err:  # the other processes learn of it from the broadcast below
                    failure = err
            path = [None if failure else str(folder.path) if folder else None]
            if ctx.enabled:
                torch.distributed.broadcast_object_list(path, src=0)
            if failure is not None:
                raise failure
            if path[0] is None:
                raise ConfigError("process 0 could not start the run (its error says why).")
        except BaseException:
            if folder is not None:
                folder.release(failed=True)
            raise
        config.output_dir = Path(path[0])
        run = cls(config, job, ctx, folder, Path(path[0]), state)
        run.preset_reason = state.get("preset_reason", "the run's checkpoint") if state else preset_reason
        run.normalization_reason = state.get("normalization_reason", "the run's checkpoint") if state else normalization_reason
        if ctx.is_main and not run.finished:
            if state is not None:
                sources = {name: "the checkpoint's" for name in PRESET_FIELDS if name not in given}
            normalization = (config.normalize_observations == "yes", run.normalization_reason)
            print(describe_preset(config.preset, run.preset_reason, config, sources, normalization), file=sys.stderr)
            if config.device == "cpu" and config.threads != "auto" and config.threads > available_cpus():
                print(f"iql_torchrl: --threads {config.threads} is more than the {available_cpus()} CPUs this process may "
                      "run on: the extra threads share cores and slow every update (--threads auto takes "
                      f"{auto_threads()}).", file=sys.stderr)
            if state is not None:
                print(f"{run.output_dir}: resuming from update {state['step']}.", file=sys.stderr)
        return run

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.stop_request.stop_listening()
        if self.folder is not None:
            self.folder.release(failed=exc_type is not None)

    def finished_summary(self) -> dict:
        """The summary of a finished run, read back (nothing is written)."""
        if not self.ctx.is_main:
            return {}
        print(f"{self.output_dir}: this run is finished ({SUMMARY_NAME} is there); nothing to do.", file=sys.stderr)
        return json.loads((self.output_dir / SUMMARY_NAME).read_text())

    # ------------------------------------------------------------------ data
    def load_data(self, dataset: str | None = None, source: dict | None = None):
        """The offline replay buffer, after the checks a run needs before training (:func:`load_run_data`).

        ``source``: the checkpoint whose data the run must match and whose observation statistics it keeps (by
        default a resumed run's own; fine-tuning passes the offline run it starts from).
        """
        buffer, self.fingerprint = load_run_data(self.config, self.ctx, self.device, dataset or self.config.dataset,
                                                 source or self.state)
        self.metadata = buffer.metadata
        if self.job == "offline":  # fine-tuning adds online rewards the bound does not know
            self.value_bound.bound = return_bound(buffer_transitions(buffer)["next", "reward"], self.config.gamma)
        return buffer

    # ------------------------------------------------------------------ training state
    def attach(self, loss, update, generators: list[torch.Generator], seeds: list[int], *, extra_state=None,
               point_fields=None) -> None:
        """The networks, update step and batch generators this run trains and checkpoints.

        ``extra_state()`` returns the job's own checkpoint entries; ``point_fields()`` the job's
        fields of each learning-curve point. A resumed run gets its saved state back here.
        """
        self.loss, self.update, self.generators, self.seeds = loss, update, generators, seeds
        self.extra_state = extra_state or dict
        self.point_fields = point_fields or dict
        if self.ctx.is_main:
            self.logger = make_logger(self.config, self.folder, None if self.state is None else self.state["step"],
                                      self._evaluation_pending(), self.wandb_id)
            if self.config.logger == "wandb":
                self.wandb_id = self.logger.experiment.id
        if self.state is not None:
            loss.load_state_dict(self.state["loss"])
            update.load_state_dict(self.state["update"])
            self.step, self.curve = self.state["step"], self.state["curve"]
            self._redraw(restore_rng(self.state["rng"][self.ctx.rank], generators))
            self.value_bound.beyond_at = self.state.get("values_beyond_bound_at")
            self.last_checkpoint_step = self.step

    def _redraw(self, elsewhere: list[int]) -> None:
        """Seeds the batch streams saved on another kind of device (``--device`` changed on resume) from the
        run's seed, rank and update, so that resuming is still repeatable, and says so."""
        for index in elsewhere:
            entropy = [self.seeds[index], self.ctx.rank, self.step]
            self.generators[index].manual_seed(int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1))
        if elsewhere and self.ctx.is_main:
            print(f"{self.output_dir}: its batches were drawn on another kind of device than {self.device}, whose "
                  f"random state this one cannot continue: from update {self.step} on they are drawn anew (seeded by "
                  "the run's seed and that update), not as the run would have drawn them where it started.",
                  file=sys.stderr)

    def read_metrics(self, metrics, extra: dict | None = None) -> dict:
        """The interval's one host sync: metrics to floats, the non-finite guard, the value-bound watch, the log."""
        values = metrics_to_floats(metrics)
        self.timing.pause()
        self.guard()
        self.value_bound.watch(values.get("value_mean"), self.step, speak=self.ctx.is_main)
        self.last_values = values
        log_values(self.logger, {**values, **(extra or {})}, self.step)
        return values

    def guard(self) -> None:
        """Stops the run with :class:`NonFiniteLossError` once a loss has been non-finite."""
        report = self.update.nonfinite_report()
        if report is not None:
            raise NonFiniteLossError(f"Training stopped: {report}. {self._kept()} "
                                     "Try a lower --lr or check the dataset for extreme values.")

    def _kept(self) -> str:
        if self.last_checkpoint_step is None:
            return "No checkpoint was written before it."
        return f"The last checkpoint (update step {self.last_checkpoint_step}, written before it) is intact."

    def checkpoint(self, evaluate_pending: bool = False) -> None:
        """Writes the checkpoint (rank 0; every rank contributes its batch stream); never non-finite parameters."""
        self.guard()
        if not all(torch.isfinite(p).all() for p in self.loss.parameters()):
            raise NonFiniteLossError(f"Training stopped: parameters became non-finite before update {self.step}. "
                                     f"{self._kept()} Try a lower --lr.")
        rng = [capture_rng(self.generators)]
        if self.ctx.enabled:  # every rank's batch stream, so each resumes its own
            rng = [None] * self.ctx.world_size
            torch.distributed.all_gather_object(rng, capture_rng(self.generators))
        if self.ctx.is_main:
            save_checkpoint(self.output_dir / CHECKPOINT_NAME, {
                "job": self.job,
                "loss": self.loss.state_dict(),
                "update": self.update.state_dict(),
                "rng": rng,
                "world_size": self.ctx.world_size,
                "step": self.step,
                "curve": self.curve,
                "evaluate_pending": evaluate_pending,
                "timing": self.timing.state_dict(),
                "metadata": self.metadata.state_dict(),
                "data": self.fingerprint,
                "config": config_to_dict(self.config),
                "preset_reason": self.preset_reason,
                "normalization_reason": self.normalization_reason,
                "values_beyond_bound_at": self.value_bound.beyond_at,
                "wandb_id": self.wandb_id,
                "version": iql_torchrl.__version__,
                **self.extra_state(),
            })
        self.last_checkpoint_step = self.step

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict | None:
        """Deterministic episodes of every seed's policy (rank 0): a learning-curve point and the log."""
        if not self.ctx.is_main:
            return None
        summary = evaluate_seeds(self.loss, self.seeds, self.metadata, self.config.eval_episodes, self.device)
        if getattr(self.config, "sweep", None) is not None:  # each member's entry names its setting
            for entry, setting in zip(summary["per_seed"], member_settings(self.config)):
                entry.update(setting)
        self.curve.append({"step": self.step, **self.point_fields(),
                           **{k: summary[k] for k in ("normalized_score", "success_rate", "return_mean", "per_seed")}})
        log_values(self.logger, {k: summary[k] for k in EVALUATION_KEYS if summary[k] is not None}, self.step)
        self.last_eval = summary
        return summary

    def checkpoint_and_evaluate(self) -> dict | None:
        """Checkpoint first, so a failing evaluation loses nothing; a resumed run redoes the evaluation."""
        self.checkpoint(evaluate_pending=True)
        return self.evaluate()

    def evaluate_if_pending(self) -> None:
        """A resumed run whose checkpoint was written right before an evaluation evaluates first."""
        if self._evaluation_pending() and self.step == self.state["step"]:
            self.evaluate()

    def _evaluation_pending(self) -> bool:
        """Whether this run resumes from a checkpoint written right before an evaluation its curve lacks."""
        state = self.state
        return (state is not None and bool(state.get("evaluate_pending"))
                and not any(p["step"] == state["step"] for p in state["curve"][-1:]))

    # ------------------------------------------------------------------ the loops' cadence
    def updates(self, last_step: int, update, desc: str = "IQL"):
        """The loop over update steps ``run.step + 1 … last_step``: yields each step number; the loop's body
        calls ``update`` once and hands its metrics to :meth:`after_update`."""
        self.progress = self.loop_progress(update, total=last_step, initial=self.step, desc=desc)
        self._last_step = last_step
        try:
            for step in range(self.step + 1, last_step + 1):
                self.progress.start_updates()
                yield step
        finally:
            self.progress.close()

    def after_update(self, metrics) -> None:
        """One update of :meth:`updates` done: counted and timed; then what is due (:meth:`after_updates`)."""
        self.progress.end_updates(1)
        self.step += 1
        self.progress.advance(1)
        self.after_updates(metrics, self.step - 1, self.step == self._last_step)

    def loop_progress(self, update, total: int, initial: int, desc: str, unit: str = "upd") -> LoopProgress:
        """The progress bar and clock of a loop about to run ``update`` (shown on rank 0 with ``--progress``);
        until it closes, a single-process run takes Ctrl-C after the update in progress."""
        return LoopProgress(self.timing, update, total=total, initial=initial, desc=desc, unit=unit,
                            enabled=self.config.progress and self.ctx.is_main,
                            stop_request=None if self.ctx.enabled else self.stop_request)

    def run_updates(self, update, draw, count: int):
        """``count`` updates on batches from ``draw()`` in the current loop, timed; returns the last one's metrics."""
        metrics = None
        if self.progress.compile_pending:  # the compiling call, timed apart
            self.progress.start_updates()
            metrics = update(draw())
            self.progress.end_updates(1)
            count -= 1
        if count:
            self.progress.start_updates()
            for _ in range(count):
                metrics = update(draw())
            self.progress.end_updates(count)
        return metrics

    def due(self, before: int, after: int, last: bool) -> tuple[bool, bool, bool]:
        """Whether updates from step ``before`` to ``after`` log, checkpoint, evaluate: each when its interval's
        multiple was reached on the way; the ``last`` updates of a loop do all three."""
        def reached(every: int) -> bool:
            return after // every > before // every

        config = self.config
        evaluate = reached(config.eval_every) or last
        checkpoint = evaluate or reached(config.checkpoint_every)
        return checkpoint or reached(config.log_every), checkpoint, evaluate

    def after_updates(self, metrics, before: int, last: bool, extra=None) -> None:
        """What is due after the updates from step ``before`` to ``self.step`` (:meth:`due`): the log
        (with ``extra()``'s entries), then the evaluation (checkpointed first, and after too at a loop's end, so
        a finished run's checkpoint holds its whole curve) or the checkpoint; then, after a Ctrl-C, the stop
        (:meth:`stop_if_requested`)."""
        log_now, checkpoint_now, evaluate_now = self.due(before, self.step, last)
        if log_now:
            self.read_metrics(metrics, extra() if extra else None)  # waits for the updates: their time, not left out
            started = time.perf_counter()
            if evaluate_now:
                self.checkpoint_and_evaluate()
                if last:  # the loop's last checkpoint holds its last evaluation too
                    self.checkpoint()
            elif checkpoint_now:
                self.checkpoint()
            self.progress.show(self.last_values, self.curve)
            self.progress.leave_out(time.perf_counter() - started)
        if not last:  # a loop ends checkpointed: the run finishes, or its next loop stops at its first updates
            self.stop_if_requested()

    def stop_if_requested(self) -> None:
        """After a Ctrl-C: checkpoints the updates done, says how to continue and ends the run (:class:`RunInterrupted`)."""
        if not self.stop_request.requested:
            return
        self.timing.pause()
        self.checkpoint()
        self.progress.close()
        stop = RunInterrupted(self.step, self.output_dir, self.job)
        if self.ctx.is_main:
            print(stop.message, file=sys.stderr)
        raise stop

    # ------------------------------------------------------------------ summary
    def summary_fields(self) -> dict:
        """The summary entries every job reports: the last evaluation, speed, wall time, curve."""
        last = self.last_eval
        return {
            **{k: last[k] for k in ("normalized_score", "normalized_score_std", "return_mean", "return_std", "per_seed")},
            "success_rate": last.get("success_rate"), "preset_reason": self.preset_reason,
            "normalize_observations": self.config.normalize_observations, "normalization_reason": self.normalization_reason,
            "success_terminal": self.metadata.success_terminal,
            "value_bound": self.value_bound.bound, "values_beyond_bound_at": self.value_bound.beyond_at,
            "eval_episodes": self.config.eval_episodes,
            "updates_per_second": self.timing.updates_per_second,
            "compile_seconds": self.timing.compile_seconds if self.config.compile or self.config.cudagraphs else None,
            "wall_seconds": self.timing.wall_seconds,
            "run_dir": str(self.output_dir),
            "curve": self.curve,
            "version": iql_torchrl.__version__,
        }

    def offline_summary(self, update) -> tuple[dict, str]:
        """The offline job's summary (the settings that shaped it, then :meth:`summary_fields`) and the
        title of its learning curve: :meth:`finish`'s arguments."""
        config, ctx = self.config, self.ctx
        summary = {
            "dataset": config.dataset, "steps": config.steps, "seed": config.seed, "num_seeds": config.num_seeds,
            "sweep": None if config.sweep is None else sweep_results(self.curve, config),  # per setting, per member
            "temperature": config.temperature, "expectile": config.expectile, "preset": config.preset,
            "actor": config.actor_kind(self.metadata),
            "order": config.order, "mode": update.mode, "compilations": update.compilations,
            "precision": update.precision,
            "threads": torch.get_num_threads(), "device": config.device, "batch_size": config.batch_size,
            "world_size": ctx.world_size, "global_batch_size": config.batch_size * ctx.world_size,
            **(self.summary_fields() if ctx.is_main else {}),
        }
        seeds = sorted(set(self.seeds))
        seeds_label = f"seed {config.seed}" if len(seeds) == 1 else f"seeds {seeds[0]}–{seeds[-1]}, mean"
        if config.sweep is not None:
            seeds_label = f"{len(summary['sweep']['settings'])} settings × {seeds_label}"
        return summary, f"IQL on {config.dataset} ({seeds_label})"

    def finish(self, summary: dict, title: str, phase_boundary: int | None = None) -> dict:
        """Writes ``summary.json`` and the learning curve (rank 0), closes the logger; returns the summary."""
        if self.ctx.is_main:
            self.folder.write_text_atomic(SUMMARY_NAME, json.dumps(summary, indent=2))
            if summary.get("sweep"):  # one line per setting
                plot_sweep_curves(self.curve, summary["sweep"], self.output_dir / "learning_curve.png", title)
            else:
                plot_curve(self.curve, self.output_dir / "learning_curve.png", title, phase_boundary=phase_boundary)
            if self.logger is not None and self.config.logger == "wandb":
                self.logger.experiment.finish()
        self.ctx.barrier()
        return summary if self.ctx.is_main else {}
