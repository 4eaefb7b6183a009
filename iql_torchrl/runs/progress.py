"""A training loop's progress bar and clock.

Updates per second count the updates only (:class:`~iql_torchrl.runs.timing.RunTiming`): the first
call of a compiled step in a loop compiles it (the first call, or a new call signature), so that call
is timed apart, into the compile time, and the bar reads "<desc> (compiling the update step)" while
it runs; the bar's rate and ETA start after it, and leave out the loop's logging, checkpoints and
evaluations (:meth:`LoopProgress.leave_out`), as updates per second do.

While the bar is open, a Ctrl-C asks the loop to stop after its update (a
:class:`~iql_torchrl.runs.interrupt.StopRequest`, listening from the bar's start to its close).
"""
from __future__ import annotations

import time

from tqdm.auto import tqdm

from iql_torchrl.runs.interrupt import StopRequest
from iql_torchrl.runs.timing import RunTiming

__all__ = ["LoopProgress", "restart_progress_clock"]


class LoopProgress:
    """The bar and clock of one loop running ``update``; ``enabled=False`` keeps the clock and hides the bar.
    ``stop_request`` listens for Ctrl-C until :meth:`close`."""

    def __init__(self, timing: RunTiming, update, *, total: int, initial: int, desc: str, unit: str = "upd",
                 enabled: bool = True, stop_request: StopRequest | None = None):
        self.timing, self.desc, self.stop_request = timing, desc, stop_request
        self.compile_pending = update.mode != "eager"
        self._compile_start = None
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, mininterval=1.0, dynamic_ncols=True,
                        disable=not enabled)
        if stop_request is not None:
            stop_request.listen()

    def start_updates(self) -> None:
        """Updates are about to run: the clock runs (or, before a compiling call, the compile clock)."""
        if self.compile_pending:
            self.bar.set_description_str(f"{self.desc} (compiling the update step)")
            self._compile_start = time.perf_counter()
        else:
            self.timing.start()

    def end_updates(self, count: int = 1) -> None:
        """``count`` updates ran since :meth:`start_updates` (one, if it was the compiling call)."""
        if self._compile_start is not None:
            self.timing.compile_seconds += time.perf_counter() - self._compile_start
            restart_progress_clock(self.bar, self.desc)
            self._compile_start, self.compile_pending = None, False
        else:
            self.timing.count(count)

    def advance(self, n: int = 1) -> None:
        self.bar.update(n)

    def leave_out(self, seconds: float) -> None:
        """Keeps ``seconds`` spent since the last update (an evaluation, a checkpoint) out of the bar's rate and ETA."""
        if not self.bar.disable:  # tqdm's rate: steps over the time since its last print; its elapsed: since start_t
            self.bar.start_t += seconds
            self.bar.last_print_t += seconds

    def show(self, last_values: dict, curve: list[dict]) -> None:
        """The bar's postfix: updates/s, the critics' last loss, the last evaluation's score and success rate."""
        rate = self.timing.updates_per_second
        postfix = {"upd/s": f"{rate:.0f}" if rate else "-", "loss_q": f"{last_values['loss_qvalue']:.3g}"}
        if curve and curve[-1].get("normalized_score") is not None:
            postfix["score"] = f"{curve[-1]['normalized_score']:.1f}"
        if curve and curve[-1].get("success_rate") is not None:
            postfix["success"] = f"{curve[-1]['success_rate']:.0%}"
        self.bar.set_postfix(postfix)

    def close(self) -> None:
        self.bar.close()
        if self.stop_request is not None:
            self.stop_request.stop_listening()


def restart_progress_clock(bar, desc: str) -> None:
    """Restarts a tqdm bar's clock (its rate and ETA count from here, e.g. after a first update that
    compiled the step) and sets its description to ``desc``."""
    bar.set_description_str(desc, refresh=False)
    bar.unpause()  # tqdm moves its start time past the time since the bar last printed
