"""Ctrl-C (or SIGTERM) in a training loop: the run stops after the update in progress, with a checkpoint there.

While a loop runs, :class:`StopRequest` stands in for Python's SIGINT handler and for SIGTERM's default
(what a batch scheduler sends before it kills a job): the first signal only sets
:attr:`StopRequest.requested` and puts both handlers back, so the loop finishes its update, checkpoints it
and ends (:class:`RunInterrupted`), and a second one stops at once, as always. It takes over only from the
main thread and only from the handlers Python starts with (an ignored signal, or a handler of the caller's,
stays as it is), and puts them back when the loop ends.
"""
from __future__ import annotations

import signal
import threading
from pathlib import Path

__all__ = ["StopRequest", "RunInterrupted", "INTERRUPTED_STATUS"]

INTERRUPTED_STATUS = 130  # a shell's status for a command stopped by SIGINT (128 + 2)
_SCRIPTS = {"offline": "examples/iql_offline.py", "finetune": "examples/iql_finetune.py"}


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C or SIGTERM after a checkpoint: Python's KeyboardInterrupt, which a job's command line
    (:func:`iql_torchrl.jobs.cli.run_job`) ends with status 130 and no traceback."""

    def __init__(self, step: int, output_dir: Path, job: str):
        super().__init__(step)
        self.step, self.output_dir = step, output_dir
        script = _SCRIPTS.get(job, "the job's script")
        self.message = (f"interrupted at update {step} (checkpoint written): continue with "
                        f"python {script} --resume --output-dir {output_dir}")

    def __str__(self) -> str:
        return self.message


# the handler each signal has when Python starts: the ones a request may stand in for
_PYTHON_HANDLERS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}


class StopRequest:
    """Whether Ctrl-C or SIGTERM asked the running loop to stop; :meth:`listen` while the loop runs,
    :meth:`stop_listening` after."""

    def __init__(self):
        self.requested = False
        self._previous = {}  # signal → Python's handler, while ours stands in for it

    def listen(self) -> None:
        """Takes the first SIGINT or SIGTERM from here on (main thread, Python's own handler in place, not asked
        already)."""
        if self.requested or self._previous or threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in _PYTHON_HANDLERS.items():
            if signal.getsignal(signum) is handler:
                self._previous[signum] = signal.signal(signum, self._request)

    def stop_listening(self) -> None:
        """Puts Python's handlers back (a no-op when they are in place)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _request(self, signum, frame) -> None:
        self.requested = True
        self.stop_listening()  # a second signal stops at once
