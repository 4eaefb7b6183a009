"""How an update step runs: eager, compiled, or replayed as a CUDA graph.

:class:`StepRunner` runs a step (a method of one input: a batch TensorDict or a tensor of indices) in one of
:data:`MODES`: ``"eager"``, the method itself; ``"compile"``, ``torch.compile`` as one graph; ``"cudagraphs"``,
that graph captured once in a CUDA graph and replayed (:class:`~iql_torchrl.step.cuda_graph.CudaGraphStep`).

A variant is a call signature (the input's structure, the step's ``specialisation``) with the Python values
its trace read (:class:`~iql_torchrl.step.baked.BakedValues`). Without a gradient hook, dynamo evaluates its
guards only on a call that meets a new variant, where they compile the step anew (or pick the compilation made
for those values); the other calls skip them (``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``, scoped
to the call). A CUDA graph is captured anew in the same case. Compiled steps are kept between runs by torch's FX
graph and AOTAutograd caches. With an :class:`~iql_torchrl.step.eager_check.EagerCheck`, the calls that meet a
new variant or capture a step, and ``check_calls`` calls after them, are also taken eagerly and compared.

Every experimental torch API the project uses lives here (guard filters and the guard-skipping stance, inductor
options, torch's pytree for TensorDict's registration, the guards dropped on tensordict's tensorclass memo,
code-object cloning), besides the operator :mod:`iql_torchrl.step.optimizers` defines. None changes a
process-wide setting: inductor options reach only this step's compilation, the stance and warning filters only
its calls.
"""
from __future__ import annotations

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
# tensordict's to_module reads a config torch deprecates, warning on every trace: nothing a user can act on
_TRACING_NOISE = r"torch\._dynamo\.config\.inline_inbuilt_nn_modules is deprecated"
# tensordict's memo of which classes are tensorclasses, filled by eager calls: a guard on it fails at the next
# eager call (a vmapped step compiled twice), and what it holds never changes what the step computes
_MEMO_SOURCE = "_TENSORCLASS_MEMO"
_copies = itertools.count(1)


def missing_compiler(device_type: str) -> str | None:
    """Why the step cannot be compiled for ``device_type`` here (on the CPU inductor needs a C++ compiler), or
    None when it can."""
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
    """Inductor settings of the step's own compilation (``torch.compile``'s ``options``, a scoped patch).

    No per-call size and stride asserts: the guards (or the call signature) check them. On the CPU, kernels are
    called from C++ (``cpp_wrapper``: a few percent of the step, benchmarks/README.md), and the vector width
    inductor picks is named (``cpp.simdlen``): it changes no code but keys torch's FX graph cache, which would
    otherwise serve C++ built for one width to a process of another, computing wrong values (docs/performance.md).
    Before torch 2.13, loop reordering after fusion crashes the CUDA compile (pytorch/pytorch#176591).
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
        step: a bound method of one input. The runner runs a copy with a code object of its own: dynamo keeps
            one cache per code object, so no recompile limit is shared with another step of the same class.

    Keyword Args:
        mode (str): one of :data:`MODES` (the caller checks it first: :func:`check_mode`).
        fullgraph (bool): compile the step as one graph (any graph break raises).
        skip_guards (bool): mode ``"compile"``: evaluate dynamo's guards only on calls that meet a new variant.
        eager_random (bool): compiled random ops (dropout) draw from eager's generator: the same masks as eager.
        specialisation (callable): what else the compiled step is specialised on and may change between calls
            (the data's layout, train/eval flags, autocast): a change is a new variant.
        device_type (str): where the step runs (``"cpu"``, ``"cuda"``): the inductor settings it needs.
        check (EagerCheck, optional): compares compiled calls with eager ones.
        check_calls (int): how many calls after each new variant or capture are checked besides it (0: none).
        fall_back (bool): on a mismatch, warn and run eager from then on (that call's result is the eager one),
            instead of raising :class:`~iql_torchrl.step.eager_check.StepMismatch` with nothing applied.
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
        # tensordict registers TensorDict's pytree constructor on first use, a change guards would see: use it now
        tree_unflatten(*tree_flatten(TensorDict()))
        options = inductor_options(device_type)
        if eager_random:
            options["fallback_random"] = True  # this compilation only: torch.compile applies options as a scoped patch
        # static shapes: the batch size is fixed for a run; a dynamic one is slower, and dropout under torch.func
        # does not support it
        self.guarded = _traced_quietly(torch.compile(self.step_function, fullgraph=fullgraph, dynamic=False,
                                                     options={**options, "guard_filter_fn": self._record_guards}))
        if mode == "cudagraphs":  # the graph replays without calling the compiled step (nor its warning filter)
            self.guarded = CudaGraphStep(self.guarded, baked=self._baked_since_capture)

    def _record_guards(self, entries):
        """A guard filter: records the step's own trace's guards (what it read) and counts it, and keeps every guard
        but those on tensordict's memo. Frames dynamo compiles after the step's graph (torch 2.11: tensordict's
        batch-size check of vmapped outputs) are not the step's trace: their guards are not on the step's owner."""
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


def _traced_quietly(compiled):
    """A compiled step (it traces on its first call and on recompiles) called without tensordict's warning."""
    def call(batch_or_indices):
        if torch.compiler.is_compiling():  # traced into an enclosing compiled graph: dynamo cannot trace catch_warnings
            return compiled(batch_or_indices)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_TRACING_NOISE, category=FutureWarning)
            return compiled(batch_or_indices)

    return call
