"""A run's settings before any work: a resumed run's from its checkpoint, the preset's values, the
device and whether the update step compiles (``--compile auto``), each checked with a one-line error."""
from __future__ import annotations

import os
import sys

import torch

from iql_torchrl.runs.checkpoint import load_run_checkpoint
from iql_torchrl.runs.config import ConfigError
from iql_torchrl.runs.resume import STEP_WAYS, ResumeError, resumed_config
from iql_torchrl.step.modes import missing_compiler
from iql_torchrl.runs.threads import set_threads, threads_are_auto
from iql_torchrl import precision_choice
from iql_torchrl.precision_choice import ONE_THREAD_PAYS, PrecisionChoice, choose_precision, widest_layer

__all__ = ["resolve_settings", "resolved_device", "check_device", "resolve_precision", "auto_compile", "COMPILE_BREAK_EVEN"]


def resolved_device(device: str) -> str:
    """``--device`` (cpu, cuda or auto) as a run takes it: auto picks cuda where there is one; checked (:func:`check_device`)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    check_device(device)
    return device


def check_device(device: str) -> None:
    """Refuses ``--device cuda`` on a machine without CUDA (:class:`ConfigError`, saying what to pass)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here; use --device cpu (or auto).")


def resolve_settings(config, job: str, given: set[str]):
    """The run's resolved settings (a resumed run's from its checkpoint), and the checkpoint to resume."""
    state = None
    if config.resume:
        state = load_run_checkpoint(config.output_dir, map_location="cpu")
        if state.get("job") != job:
            raise ResumeError(f"{config.output_dir} holds a {state.get('job', 'different')} run, not a {job} run: "
                              "continue it with the script that started it.")
        config = resumed_config(type(config), state["config"], config, given)
        config.check()
    config = config.resolved()
    if state is not None:
        _fit_resumed_step(config, given, state["config"]["device"])
    if config.cudagraphs is True and config.device != "cuda":
        raise ConfigError("--cudagraphs needs CUDA (--device cuda on a machine with a GPU).")
    check_device(config.device)
    # the step's mode is the run's own choice unless a flag forced compiling or CUDA graphs (a resumed run: its command's)
    chosen = "compile" not in given and not ("cudagraphs" in given and config.cudagraphs is True)
    reason = None
    if config.compile == "auto":
        config.compile, reason = auto_compile(config)
    elif config.compile and (problem := missing_compiler(config.device)) is not None:  # auto checked it already
        raise ConfigError(f"--compile: {problem} (leave out --compile).")
    graphs_chosen = config.cudagraphs == "auto"
    if graphs_chosen:
        config.cudagraphs = _cuda_graphs_by_default(config)
    if reason is not None and int(os.environ.get("RANK", "0")) == 0:
        if config.cudagraphs and graphs_chosen:
            reason += ", replayed as a CUDA graph (--no-cudagraphs: compiled only)"
        how = "compiled" if config.compile else "eager"
        check = (": its first updates are checked against the eager step, which takes over if they disagree"
                 if config.compile else "")
        print(f"iql_torchrl: the update step runs {how}: {reason}{check}. --compile / --no-compile force it.",
              file=sys.stderr)
    config.step_chosen = chosen
    return config, state


def _cuda_graphs_by_default(config) -> bool:
    """``--cudagraphs auto``: CUDA graphs wherever the step compiles on CUDA."""
    return bool(config.compile) and config.device == "cuda"


def _fit_resumed_step(config, given: set[str], saved_device: str) -> None:
    """A resumed run's step on a machine its checkpoint's way does not suit: compiled on a machine without a C++
    compiler, eager; moved between the CPU and a GPU, CUDA graphs as that device's default has them (a compiled
    step replayed as one on CUDA, never on the CPU). Said in one line each; the step computes the same updates
    either way, and a flag given on the command line is never replaced."""
    said = []
    if config.compile is True and "compile" not in given and (problem := missing_compiler(config.device)):
        config.compile = False
        said.append(f"iql_torchrl: the run compiled its step; it goes on eager here: {problem}.")
    if "cudagraphs" not in given and config.device != saved_device:
        graphs = _cuda_graphs_by_default(config)
        if graphs != config.cudagraphs:
            said.append(f"iql_torchrl: the run's step ran on {saved_device}; on {config.device} it goes on "
                        f"{STEP_WAYS['cudagraphs'](graphs)}.")
            config.cudagraphs = graphs
    if said and int(os.environ.get("RANK", "0")) == 0:
        print("\n".join(said), file=sys.stderr)


# --compile auto: compiling the default step on 2 CPU cores is repaid after a couple of thousand updates
# (docs/fused-step.md, "The main job compiles by default", has the measurements); 5,000 leaves room for
# slower machines and longer compiles
COMPILE_BREAK_EVEN = 5_000


def auto_compile(config) -> tuple[bool, str]:
    """Whether ``--compile auto`` compiles this run's update step, and why, in words."""
    if (problem := missing_compiler(config.device)) is not None:
        return False, problem
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # the gradient all-reduce breaks the graph: tested step-level only
        return False, "under torchrun the compiled step runs guarded, tested at the IQLUpdate level only"
    updates = config.total_updates()
    if updates < COMPILE_BREAK_EVEN:
        return False, f"{updates} updates are fewer than the {COMPILE_BREAK_EVEN} that repay compiling"
    return True, f"{updates} updates repay compiling it (from {COMPILE_BREAK_EVEN} on)"


def resolve_precision(config, loss, distributed: bool = False) -> None:
    """``--precision auto``: bf16 or fp32 for this run's ``loss``, measured on its threads, said on one line;
    where the threads are the run's own choice (``--threads auto``, no ``OMP_NUM_THREADS``) a bf16 step takes
    one thread where its GEMMs run faster there
    (:func:`~iql_torchrl.precision_choice.choose_precision`). Under torchrun rank 0 measures and every process
    takes its choice. Sets ``config.precision`` (and torch's threads); a resolved precision stays as it is.
    """
    may_take_one_thread = threads_are_auto(config.threads) and config.device == "cpu" and bool(config.compile)
    if config.precision == "fp32" or (config.precision == "bf16" and not may_take_one_thread):
        return
    choice = PrecisionChoice(config.precision, "asked for")
    if int(os.environ.get("RANK", "0")) == 0:
        layer, seeds = widest_layer(loss)
        if config.precision == "auto":
            choice = choose_precision(config.device, bool(config.compile), layer, config.batch_size, stacked=seeds,
                                      may_take_one_thread=may_take_one_thread)
            print(f"iql_torchrl: the update step computes in {choice.precision}"
                  f"{' on one thread' if choice.threads == 1 else ''}: {choice.reason}. "
                  "--precision fp32 / bf16 (and --threads) force it.", file=sys.stderr)
        elif layer is not None and precision_choice.native_bf16() is not None:
            alone = precision_choice.one_thread_speedup(*layer, config.batch_size, seeds)
            if alone >= ONE_THREAD_PAYS:
                choice = PrecisionChoice("bf16", "asked for", threads=1)
                print(f"iql_torchrl: the bf16 step runs on one thread: its {layer[0]}×{layer[1]} layers' GEMMs "
                      f"measured {alone:.2f}× faster there than on {torch.get_num_threads()}. --threads forces a "
                      "count.", file=sys.stderr)
    if distributed:
        chosen = [choice]
        torch.distributed.broadcast_object_list(chosen, src=0)
        choice = chosen[0]
    config.precision = choice.precision
    if choice.threads is not None:
        set_threads(choice.threads)
