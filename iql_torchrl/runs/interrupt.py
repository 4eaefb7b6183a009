"""Ctrl-C in a training loop: the run stops after the update in progress, with a checkpoint there.

While a loop runs, :class:`StopRequest` stands in for Python's SIGINT handler: the first Ctrl-C only
sets :attr:`StopRequest.requested` and puts Python's handler back, so the loop finishes its update,
checkpoints it and ends (:class:`RunInterrupted`), and a second Ctrl-C stops at once, as always. It
takes over only from the main thread and only from Python's own handler (an ignored SIGINT, or a
handler of the caller's, stays as it is), and puts that handler back when the loop ends.
"""
from __future__ import annotations

import signal
import threading
from pathlib import Path

__all__ = ["StopRequest", "RunInterrupted", "INTERRUPTED_STATUS"]

INTERRUPTED_STATUS = 130  # a shell's status for a command stopped by SIGINT (128 + 2)
_SCRIPTS = {"offline": "examples/iql_offline.py", "finetune": "examples/iql_finetune.py"}


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C after a checkpoint: Python's KeyboardInterrupt, which a job's command line
    (:func:`iql_torchrl.jobs.cli.run_job`) ends with status 130 and no traceback."""

    def __init__(self, step: int, output_dir: Path, job: str):
        super().__init__(step)
        self.step, self.output_dir = step, output_dir
        script = _SCRIPTS.get(job, "the job's script")
        self.message = (f"interrupted at update {step} (checkpoint written): continue with "
                        f"python {script} --resume --output-dir {output_dir}")

    def __str__(self) -> str:
        return self.message


class StopRequest:
    """Whether Ctrl-C asked the running loop to stop; :meth:`listen` while the loop runs, :meth:`stop_listening` after."""

    def __init__(self):
        self.requested = False
        self._previous = None  # Python's handler while ours stands in for it

    def listen(self) -> None:
        """Takes the first SIGINT from here on (main thread, Python's own handler in place, not asked already)."""
        if self.requested or self._previous is not None or threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._request)

    def stop_listening(self) -> None:
        """Puts Python's handler back (a no-op when it is in place)."""
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _request(self, signum, frame) -> None:
        self.requested = True
        self.stop_listening()  # a second Ctrl-C stops at once
