"""How an update step runs: eager, compiled, or replayed as a CUDA graph.

:class:`StepRunner` takes a step (a method of one input: a batch TensorDict or a tensor of indices)
and runs it in one of :data:`MODES` behind one call:

* ``"eager"`` -- the method itself;
* ``"compile"`` -- ``torch.compile`` as one graph. Without a gradient hook, dynamo evaluates its guards
  only on the call that meets a new variant of the step; the calls after it skip them
  (``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``, scoped to the call);
* ``"cudagraphs"`` -- the guarded compiled step captured once in a CUDA graph and replayed
  (:class:`~iql_torchrl.step.cuda_graph.CudaGraphStep`).

A variant is a call signature (the input's structure and the step's ``specialisation``) with the Python
values the latest trace read (:class:`~iql_torchrl.step.baked.BakedValues`), read again before each call:
when one changed, the call runs under dynamo's guards, which compile the step anew (or pick the
compilation made for those values), so the step always computes what the eager step would. A CUDA graph is
captured anew in the same case. ``compilations`` counts the traces and captures. Compiled steps are kept
between runs by torch's own caches (the FX graph and AOTAutograd caches).

With a check (:class:`~iql_torchrl.step.eager_check.EagerCheck`), the calls that meet a new variant or
capture a step and the first ``check_calls`` calls after them (for a CUDA graph: its warm-up calls, the
capture and its first replays) are also taken eagerly and compared; a compiled step that disagrees raises,
or with ``fall_back`` warns and leaves the runner eager.

Every experimental torch API the project uses lives here: guard filters and the guard-skipping stance,
inductor options, tensordict's pytree registration, the guards on tensordict's tensorclass memo that the
step drops (named by its module-level name), code-object cloning (and, in :mod:`iql_torchrl.step.optimizers`,
the operator that calls torch's fused Adam from a graph). None of them changes a process-wide torch setting:
inductor options reach only this step's compilation (``torch.compile``'s ``options``), the stance and
warning filters only the step's calls.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import types
import warnings

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from iql_torchrl.step.baked import BakedValues
from iql_torchrl.step.cuda_graph import CudaGraphStep
from iql_torchrl.step.eager_check import EagerCheck, StepMismatch

__all__ = ["StepRunner", "MODES", "check_mode", "missing_compiler", "call_structure", "inductor_options"]

MODES = ("eager", "compile", "cudagraphs")
# tensordict's to_module reads a torch config that torch deprecates, each time the step is traced:
# a FutureWarning that tells a user of the compiled step nothing
_TRACING_NOISE = r"torch\._dynamo\.config\.inline_inbuilt_nn_modules is deprecated"
# tensordict memoizes which classes are tensorclasses in a module-level dict, filled by eager calls only; a trace
# that looked a class up there guards on the dict, and the first eager call after it (the eager check, the
# caller's code) adds that class and fails the guard: a vmapped step compiled twice. What the memo holds never
# changes what the step computes, so the guarded step drops the guards on it
_MEMO_SOURCE = "_TENSORCLASS_MEMO"
_copies = itertools.count(1)


def missing_compiler(device_type: str) -> str | None:
    """Why the step cannot be compiled for ``device_type`` on this machine, or None when it can.

    On the CPU, torch's inductor builds the step's kernels with a C++ compiler (``g++``, or the one
    the ``CXX`` environment variable names); without one the first compiled call would fail.
    """
    if device_type != "cpu":
        return None
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch._inductor.exc import InvalidCxxCompiler

    try:
        get_cpp_compiler()
    except InvalidCxxCompiler:
        return ("compiling the update step on the CPU needs a C++ compiler (torch's inductor builds its kernels "
                "with g++, or the compiler the CXX environment variable names), and none was found: install "
                "one (e.g. `apt install g++`) or run the step eager")
    return None


def check_mode(mode: str, device_type: str, owner: str = "StepRunner") -> None:
    """Raises when a step cannot run in ``mode`` on ``device_type`` here (``owner`` names the caller in the message)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    if mode == "cudagraphs" and not torch.cuda.is_available():
        raise RuntimeError("mode='cudagraphs' needs CUDA; use mode='compile' or 'eager' on this machine.")
    if mode != "eager" and (problem := missing_compiler(device_type)) is not None:
        raise RuntimeError(f"{owner}(mode={mode!r}): {problem} (mode='eager').")


def inductor_options(device_type: str, torch_version: str = torch.__version__) -> dict:
    """Inductor settings of the step's own compilation (``torch.compile``'s ``options``: a scoped patch).

    Inductor's per-call size and stride asserts repeat what dynamo's guards (or the call signature) check.
    On the CPU the graph's kernels and GEMMs are called from C++ (``cpp_wrapper``) rather than from a Python
    function, whose calls between them cost a few percent of the step (benchmarks/README.md).
    On the CPU the vector width inductor picks here (after ``ATEN_CPU_CAPABILITY``; 0: none) is named to it
    (``cpp.simdlen``), which changes no code but puts the width in the key of torch's FX graph cache: that cache
    otherwise serves C++ generated for one width to a process of another (``ATEN_CPU_CAPABILITY``, or another host
    on a shared cache folder), where it computes wrong values or aborts (docs/performance.md).
    Before torch 2.13, inductor's loop reordering after fusion crashes compiling the step for CUDA
    (pytorch/pytorch#176591, fixed in 2.13's scheduler).
    """
    options = {"size_asserts": False, "alignment_asserts": False, "cpp_wrapper": device_type == "cpu"}
    if device_type == "cpu":
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        options["cpp.simdlen"] = pick_vec_isa().bit_width()
    if device_type == "cuda" and _release(torch_version) < (2, 13):
        options["loop_ordering_after_fusion"] = False
    return options


def _release(version: str) -> tuple[int, int]:
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def call_structure(tensors: Tensor | TensorDictBase | None) -> tuple | None:
    """What a compiled step is specialised on in ``tensors``: keys, shapes, strides, dtypes, devices."""
    if tensors is None:
        return None
    if isinstance(tensors, Tensor):
        return tensors.shape, tensors.stride(), tensors.dtype, tensors.device
    return tuple((key, *call_structure(v)) for key, v in tensors.items(True, True))


class StepRunner:
    """Runs ``step`` in ``mode`` (see the module docstring); one call = one call of the step.

    Args:
        step: a bound method of one input. The runner runs a copy with a code object of its own, as
            dynamo keeps one cache per code object: each runner's compiled step has a cache of its
            own (no recompile limit shared with another step of the same class).

    Keyword Args:
        mode (str): one of :data:`MODES` (the caller checks it first: :func:`check_mode`).
        fullgraph (bool): compile the step as one graph (any graph break raises).
        skip_guards (bool): mode ``"compile"`` only: evaluate dynamo's guards only on calls that meet a new
            variant (see the module docstring); the others skip them.
        eager_random (bool): compiled random ops (dropout) draw from eager's generator, so compiled
            and eager steps, and resumed runs, draw the same masks.
        specialisation (callable): what, besides the input's structure, the compiled step is
            specialised on and may change between calls (e.g. the data's layout, train/eval flags,
            autocast): a change is a new variant.
        device_type (str): where the step runs (``"cpu"``, ``"cuda"``): the inductor settings it needs.
        check (EagerCheck, optional): compares compiled calls with eager ones (see the module docstring).
        check_calls (int): how many calls after each new variant or capture are checked besides it (0: none).
        fall_back (bool): on a mismatch, warn and run eager from then on (the mismatched call's result is the
            eager call's), instead of raising :class:`~iql_torchrl.step.eager_check.StepMismatch` with nothing applied.
    """

    def __init__(self, step, *, mode: str, fullgraph: bool = True, skip_guards: bool = False,
                 eager_random: bool = False, specialisation=tuple, device_type: str = "cpu",
                 check: EagerCheck | None = None, check_calls: int = 2, fall_back: bool = False):
        if check_calls < 0:
            raise ValueError(f"check_calls must be >= 0, got {check_calls}.")
        self.mode = mode
        self.check = check if check_calls > 0 else None
        self.check_calls = check_calls
        self.fall_back = fall_back
        self._checks_left = 0
        self._calls = 0
        # the plain step, before any compilation (e.g. for torch._dynamo.explain)
        self.step_function = types.MethodType(_own_code(step.__func__), step.__self__)
        self.specialisation = specialisation
        self.compilations = 0  # traces of the step, and CUDA graph captures
        self._guards = []  # the guards of the latest trace: what it read
        # call signature -> the values each variant's trace read (BakedValues, those values); None: every call guarded
        self.variants = {} if mode == "compile" and skip_guards else None
        if mode == "eager":
            self.guarded = self.step_function
            return
        # tensordict registers a TensorDict's pytree constructor on first use, which a compiled
        # step's guards would see as a change and recompile once; use it before compiling
        tree_unflatten(*tree_flatten(TensorDict()))
        options = inductor_options(device_type)
        if eager_random:
            options["fallback_random"] = True  # this compilation only: torch.compile applies options as a scoped patch
        # static shapes: the batch size is fixed for a run, and a dynamic batch dim would make the
        # step slower and is not supported by dropout under torch.func
        self.guarded = _traced_quietly(torch.compile(self.step_function, fullgraph=fullgraph, dynamic=False,
                                                     options={**options, "guard_filter_fn": self._record_guards}))
        if mode == "cudagraphs":  # the graph replays without calling the compiled step (nor its warning filter)
            self.guarded = CudaGraphStep(self.guarded, baked=self._baked_since_capture)

    def _record_guards(self, entries):
        """A guard filter that records a trace's guards (what it read), counts the trace, and keeps every guard but
        those on tensordict's memo (``_MEMO_SOURCE``). Only the step's own trace (its guards on ``self`` are guards on
        the step's owner) is recorded: dynamo also compiles frames that run after the step's graph (on torch 2.11,
        tensordict's batch-size check of the vmapped seeds' outputs), and their guards are not what the step read."""
        entries = list(entries)
        owner = self.step_function.__self__
        if any(entry.name == "self" and entry.has_value and entry.value is owner for entry in entries):
            self._guards = entries
            self.compilations += 1
        return [_MEMO_SOURCE not in entry.name for entry in entries]

    def _baked_since_capture(self):
        """For a CUDA graph: reads the values the latest trace baked in (a new capture reads them anew)."""
        baked = BakedValues.from_guards(self._guards, self.step_function.__self__)
        return lambda: baked(self.step_function.__self__)

    def __call__(self, batch_or_indices: TensorDictBase | Tensor):
        if self.mode == "eager" or torch.compiler.is_compiling():
            return self.guarded(batch_or_indices)
        compiled, builds = self._compiled(batch_or_indices)
        self._calls += 1
        if self.check is None:
            return compiled(batch_or_indices)
        if builds:
            self._checks_left = self.check_calls
        elif self._checks_left <= 0:
            return compiled(batch_or_indices)
        else:
            self._checks_left -= 1
        try:
            return self.check(compiled, self.step_function, batch_or_indices, keep_eager=self.fall_back)
        except StepMismatch as mismatch:
            if not self.fall_back:
                raise StepMismatch(f"IQLUpdate(mode={self.mode!r}): {mismatch}. Nothing of this update was applied; "
                                   "run the step eager (mode='eager', or --no-compile).") from None
            warnings.warn(f"IQLUpdate(mode={self.mode!r}): {mismatch}. This update is the eager step's, "
                          "and the step runs eager from here.", stacklevel=3)
            self._to_eager()
            return mismatch.eager_output

    def _compiled(self, batch_or_indices):
        """The compiled callable for this call, and whether this call meets a new variant or captures a step."""
        if self.mode == "cudagraphs":
            return self.guarded, self.guarded.will_build()
        if self.variants is None:  # guarded: dynamo compiles on the first call (its recompiles are its own)
            return self.guarded, self._calls == 0
        owner = self.step_function.__self__
        known = self.variants.setdefault((call_structure(batch_or_indices), *self.specialisation()), [])
        if any(baked(owner) == values for baked, values in known):
            return self._skipping_guards, False
        return functools.partial(self._new_variant, known), True

    def _new_variant(self, known: list, batch_or_indices):
        """A call under dynamo's guards (they compile the step anew, or pick the compilation made for what it
        reads now), then the values its trace read, recorded for the calls that skip the guards."""
        out = self.guarded(batch_or_indices)
        owner = self.step_function.__self__
        baked = BakedValues.from_guards(self._guards, owner)
        known.append((baked, baked(owner)))
        return out

    def _skipping_guards(self, batch_or_indices):
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
            return self.guarded(batch_or_indices)

    def _to_eager(self) -> None:
        self.mode, self.guarded, self.variants = "eager", self.step_function, None


def _own_code(function: types.FunctionType) -> types.FunctionType:
    """A copy of ``function`` with a code object of its own (named ``<name>_<n>``, n counting copies)."""
    name = f"{function.__name__}_{next(_copies)}"
    code = function.__code__.replace(co_name=name)
    return types.FunctionType(code, function.__globals__, name, function.__defaults__, function.__closure__)


@contextlib.contextmanager
def _quiet_tracing():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TRACING_NOISE, category=FutureWarning)
        yield


def _traced_quietly(compiled):
    """A guarded compiled step (it traces on its first call and on recompiles) called under _quiet_tracing."""
    def call(batch_or_indices):
        if torch.compiler.is_compiling():  # traced into an enclosing compiled graph: dynamo cannot trace catch_warnings
            return compiled(batch_or_indices)
        with _quiet_tracing():
            return compiled(batch_or_indices)

    return call
