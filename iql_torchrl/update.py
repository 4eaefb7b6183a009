"""The fused IQL update: gradients → Adam steps → cosine actor LR → soft target update, one function.

One call of :class:`IQLUpdate` is one gradient step of every network. The step is a plain
function of tensors (no ``.item()``, no Python branching on tensor values, no ``backward()``,
no ``optimizer.step()``), so the same code runs

* eager (gradients from ``torch.autograd.grad``),
* under ``torch.compile`` as ONE graph (gradients from ``torch.func.grad``, which the compiler
  traces into the same graph as the losses, the optimizers and the target update),
* as a CUDA graph of that compiled step (:class:`~iql_torchrl.cuda_graph.CudaGraphStep`; CUDA only).

Update order (``order``):

* ``"paper"`` (default) -- the official implementation: step V on its expectile loss, then the
  actor and the critics with the new V (``IQLLoss.value_phase`` then ``actor_critic_phase``);
* ``"summed"`` -- TorchRL's script: the gradient of the three losses summed, then every optimizer.

Random draws (batch indices) are made by the caller, outside the step, so eager, compiled and
vmapped runs see the same batches and a resumed run continues the same random stream.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import types
import warnings

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor
from torch.optim.adam import adam
from torch.utils._pytree import tree_flatten, tree_unflatten

from iql_torchrl.adam import adam_step
from iql_torchrl.cuda_graph import CudaGraphStep
from iql_torchrl.loss import IQLLoss

__all__ = ["IQLUpdate", "cosine_decay", "MODES", "ORDERS", "OPTIMIZERS", "metrics_to_floats", "missing_compiler"]

MODES = ("eager", "compile", "cudagraphs")
ORDERS = ("paper", "summed")
OPTIMIZERS = ("adam", "adamw")
LOSS_NAMES = ("loss_value", "loss_actor", "loss_qvalue")
# each optimizer group and the loss's name for the parameters it trains
GROUPS = {"value": "value", "actor": "actor", "critic": "qvalue"}
_STATE_TENSORS = ("step", "actor_lr", "first_nonfinite_step", "nonfinite_losses")  # device state besides Adam's
BETAS, EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults, as in the paper's code
# tensordict's to_module reads a torch config that torch deprecates, each time the step is traced:
# a FutureWarning that tells a user of the compiled step nothing
_TRACING_NOISE = r"torch\._dynamo\.config\.inline_inbuilt_nn_modules is deprecated"


_copies = itertools.count(1)


def _own_code(function: types.FunctionType) -> types.FunctionType:
    """A copy of ``function`` with a code object of its own (named ``<name>_<n>``, n counting copies)."""
    name = f"{function.__name__}_{next(_copies)}"
    code = function.__code__.replace(co_name=name)
    return types.FunctionType(code, function.__globals__, name, function.__defaults__, function.__closure__)


def _structure(tensors: Tensor | TensorDictBase | None) -> tuple | None:
    if tensors is None:
        return None
    if isinstance(tensors, Tensor):
        return tensors.shape, tensors.stride(), tensors.dtype, tensors.device
    return tuple((key, *_structure(v)) for key, v in tensors.items(True, True))


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


def cosine_decay(step: Tensor, total_steps: int) -> Tensor:
    """The paper's actor learning-rate factor: 0.5·(1 + cos(π·min(step, T)/T)), from 1 down to 0."""
    progress = step.clamp(max=total_steps).to(torch.float32) / total_steps
    return 0.5 * (1.0 + torch.cos(math.pi * progress))


class IQLUpdate:
    """One call = one IQL gradient step on a batch; returns a detached metrics TensorDict.

    Args:
        loss: the :class:`~iql_torchrl.IQLLoss` whose networks are trained (or a
            :class:`~iql_torchrl.distributed.SeedEnsemble` of them).

    Keyword Args:
        total_steps (int): length of the run, for the actor's cosine learning-rate decay to 0.
            ``None`` keeps the actor's learning rate constant.
        lr (float): learning rate of every network (paper: 3e-4).
        actor_lr, critic_lr, value_lr (float, optional): per-network learning rates; ``None``
            uses ``lr``. The actor's cosine decay starts from ``actor_lr``.
        optimizer (str): ``"adam"`` (paper) or ``"adamw"`` (decoupled weight decay).
        weight_decay (float): weight decay of every network's parameters (default 0): L2 added
            to the gradient for Adam, decoupled for AdamW.
        tau (float): soft target update rate: target ← (1 − τ)·target + τ·online (paper: 0.005).
        order (str): ``"paper"`` or ``"summed"`` (see the module docstring).
        mode (str): ``"eager"``, ``"compile"`` or ``"cudagraphs"`` (needs CUDA).
        data (TensorDict, optional): the whole dataset on the training device. When given, the
            step takes a tensor of indices and gathers the batch itself (inside the graph).
        autocast_dtype (torch.dtype, optional): run the losses under ``torch.autocast`` with this
            dtype (e.g. ``torch.bfloat16``); parameters, optimizer state and the target update
            stay float32.
        grad_hook (callable, optional): called with each optimizer phase's list of gradients
            between the gradient and the optimizer step, returns the gradients to apply;
            data-parallel training averages them across processes here
            (:func:`iql_torchrl.distributed.all_reduce_gradients`).

    The optimizers are ``torch.optim.Adam`` objects (``value_optimizer``, ``actor_optimizer``,
    ``critic_optimizer``) holding the state and learning rates, stepped through torch's functional
    ``adam`` so the step stays one graph. A :class:`SeedEnsemble`'s losses have one entry per
    seed, summed before differentiation (the seeds share no parameters, so each gets its own
    gradient), and Adam, being elementwise, steps every seed independently.

    State kept on the device: ``step`` (int64), ``actor_lr`` (the current actor learning rate),
    and the first non-finite loss: ``first_nonfinite_step`` (−1 while all losses are finite) and
    ``nonfinite_losses`` (which of ``loss_value``, ``loss_actor``, ``loss_qvalue`` it was). The
    trainer reads them when it logs, so the step itself never syncs with the host.
    """

    def __init__(
        self,
        loss: IQLLoss,
        *,
        total_steps: int | None = None,
        lr: float = 3e-4,
        actor_lr: float | None = None,
        critic_lr: float | None = None,
        value_lr: float | None = None,
        optimizer: str = "adam",
        weight_decay: float = 0.0,
        tau: float = 0.005,
        order: str = "paper",
        mode: str = "eager",
        data: TensorDictBase | None = None,
        autocast_dtype: torch.dtype | None = None,
        grad_hook=None,
    ):
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}.")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}.")
        if mode == "cudagraphs" and not torch.cuda.is_available():
            raise RuntimeError("mode='cudagraphs' needs CUDA; use mode='compile' or 'eager' on this machine.")
        if total_steps is not None and total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}.")
        learning_rates = {"value": value_lr, "actor": actor_lr, "critic": critic_lr}
        learning_rates = {name: lr if rate is None else rate for name, rate in learning_rates.items()}
        for name, value in (*((f"{g}_lr", r) for g, r in learning_rates.items()), ("tau", tau)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value}.")
        if not (math.isfinite(weight_decay) and weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay}.")
        self.loss = loss
        self.total_steps = total_steps
        self.learning_rates = learning_rates
        self.tau = tau
        self.order = order
        self.mode = mode
        self.data = data
        self.grad_hook = grad_hook
        self.autocast_dtype = autocast_dtype
        device = next(loss.parameters()).device
        self.device_type = device.type
        if mode != "eager" and (problem := missing_compiler(device.type)) is not None:
            raise RuntimeError(f"IQLUpdate(mode={mode!r}): {problem} (mode='eager').")
        self.step = torch.zeros((), dtype=torch.int64, device=device)
        self.first_nonfinite_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.nonfinite_losses = torch.zeros(len(LOSS_NAMES), dtype=torch.bool, device=device)

        # per group: the loss's parameter TensorDict, its trainable leaves, and an Adam holding their state
        self.param_tds = {group: getattr(loss, f"{name}_network_params") for group, name in GROUPS.items()}
        self.params = {group: _trainable(td) for group, td in self.param_tds.items()}
        self.optimizers = {
            group: _make_optimizer(self.params[group], learning_rates[group], optimizer, weight_decay, device)
            for group in GROUPS
        }
        self.value_optimizer = self.optimizers["value"]
        self.actor_optimizer = self.optimizers["actor"]
        self.critic_optimizer = self.optimizers["critic"]
        self.actor_lr = self.actor_optimizer.param_groups[0]["lr"]
        # this step owns the target update (as SoftUpdate would); said before the target parameters
        # are read, which is when TorchRL warns about a missing updater
        for network in loss._has_update_associated:
            loss._has_update_associated[network] = True
        self.target_params = list(loss.target_qvalue_network_params.values(True, True))
        self.online_params = list(loss.qvalue_network_params.values(True, True))

        # the plain step, before any compilation (e.g. for torch._dynamo.explain); a copy with a code
        # object of its own, as dynamo keeps one cache per code object: each IQLUpdate's guarded
        # compiled step then has a cache of its own (no recompile limit shared with other steps)
        step = IQLUpdate._paper_step if order == "paper" else IQLUpdate._summed_step
        self.step_function = step_fn = types.MethodType(_own_code(step), self)
        self._dropouts = [m for m in _networks(loss) if isinstance(m, torch.nn.Dropout)]
        # mode "compile" without grad_hook: call signature -> its step compiled ahead of time (or None: run
        # guarded); None for the other modes, which call self._step_fn
        self._ahead_of_time = {} if mode == "compile" and grad_hook is None else None
        if mode == "eager":
            self._step_fn = step_fn
            return
        if self._dropouts:
            # inductor draws its own dropout masks unless told to use eager's generator:
            # with it, compiled and eager steps (and resumed runs) draw the same masks
            torch._inductor.config.fallback_random = True
        # tensordict registers a TensorDict's pytree constructor on first use, which a compiled
        # step's guards would see as a change and recompile once; use it before compiling
        tree_unflatten(*tree_flatten(TensorDict()))
        # static shapes: the batch size is fixed for a run, and a dynamic batch dim would make
        # the step slower and is not supported by dropout under torch.func.
        # inductor's per-call size/stride asserts on ~100 inputs repeat what dynamo's guards check
        # (and what the call signature stands for in the ahead-of-time step): 0.16 ms a step on CPU
        compile_options = {"fullgraph": grad_hook is None, "dynamic": False}
        inductor_options = {"size_asserts": False, "alignment_asserts": False}
        self._step_fn = _traced_quietly(torch.compile(step_fn, **compile_options, options=inductor_options))
        if mode == "cudagraphs":  # the graph replays without calling the compiled step (nor its warning filter)
            self._step_fn = CudaGraphStep(self._step_fn)
        if self._ahead_of_time is not None:
            # the step compiled ahead of time for each call signature and run without dynamo (no frame
            # lookup, no guards on every parameter and Adam state: ~0.4 ms a step on CPU); the signature
            # holds everything those guards would check that can change between calls (the input's and
            # data's shapes, strides and dtypes, dropout's train/eval, autocast)
            self._unguarded = torch.compile(
                step_fn, **compile_options,
                options={**inductor_options, "guard_filter_fn": torch.compiler.skip_all_guards_unsafe},
            )

    def __call__(self, batch_or_indices: TensorDictBase | Tensor) -> TensorDictBase:
        """One update. Pass a batch TensorDict, or indices into ``data`` when it was given."""
        if self._ahead_of_time is None or torch.compiler.is_compiling():
            return self._step_fn(batch_or_indices)
        signature = self._call_signature(batch_or_indices)
        if signature not in self._ahead_of_time:
            self._ahead_of_time[signature] = self._compile_ahead_of_time(batch_or_indices)
        step = self._ahead_of_time[signature]
        if step is None:
            return self._step_fn(batch_or_indices)
        return step(self, batch_or_indices)

    def _compile_ahead_of_time(self, example):
        """The step compiled for calls like ``example`` with ``aot_compile`` (one graph, no guards), or
        None where torch refuses it (e.g. its caches disabled): the step then runs under dynamo's guards."""
        try:
            with _quiet_tracing():
                step = self._unguarded.aot_compile(((example,), {}))
        except Exception as error:  # an experimental torch API: any refusal leaves the guarded step
            warnings.warn(
                f"IQLUpdate: compiling the step ahead of time failed ({type(error).__name__}: {error}); "
                "it runs as a guarded torch.compile step instead (same results, ~0.4 ms slower a step on CPU).",
                stacklevel=3,
            )
            return None
        step.disable_guard_check()
        return step

    def _call_signature(self, batch_or_indices) -> tuple:
        """What the compiled step is specialised on: the structure (keys, shapes, strides, dtypes,
        devices) of the input and of ``data``, the dropout layers' train/eval flags, and autocast."""
        return (
            _structure(batch_or_indices),
            _structure(self.data),
            tuple(m.training for m in self._dropouts),
            torch.is_autocast_enabled(self.device_type),
        )

    # ------------------------------------------------------------------ the step
    def _paper_step(self, batch_or_indices):
        with torch.no_grad():  # inside, not a decorator: the decorator's frame is shared by every such function
            batch = self._batch(batch_or_indices)
            value_out, target_min_q = self._descend(("value",), batch, self.loss.value_phase)
            out = self._descend(
                ("actor", "critic"), batch, lambda td, params: self.loss.actor_critic_phase(td, target_min_q, params)
            )
            out.set("loss_value", value_out["loss_value"])
            return self._finish(out)

    def _summed_step(self, batch_or_indices):
        with torch.no_grad():
            batch = self._batch(batch_or_indices)
            out = self._descend(tuple(GROUPS), batch, self.loss.evaluate)
            return self._finish(out)

    def _batch(self, batch_or_indices):
        if isinstance(batch_or_indices, Tensor):
            if self.data is None:
                raise TypeError("IQLUpdate got indices but no data: pass data=... or call it with a batch.")
            return self.data[batch_or_indices]
        return batch_or_indices

    def _descend(self, groups: tuple[str, ...], batch: TensorDictBase, phase):
        """Differentiates ``phase``'s summed losses w.r.t. ``groups`` and steps their optimizers.

        ``phase(batch, params)`` evaluates the loss at ``params`` (``None``: the loss's own
        parameters) and returns its output TensorDict (or a tuple starting with it), returned here.
        """
        # compiled, torch.func.grad traces into the one graph; eager, autograd has no wrappers to pay for
        if torch.compiler.is_compiling():

            def objective(tensors):
                # a shallow copy takes the loss's writes (log-prob, priority), which must not leave torch.func
                result = self._autocast_call(phase, batch.copy(), self._loss_params(groups, tensors))
                return _summed_losses(result), result

            grads, result = torch.func.grad(objective, has_aux=True)({g: self.params[g] for g in groups})
            grads = [grad for g in groups for grad in grads[g]]
        else:
            with torch.enable_grad():
                result = self._autocast_call(phase, batch, None)
                params = [p for g in groups for p in self.params[g]]
                grads = torch.autograd.grad(_summed_losses(result), params, allow_unused=True, materialize_grads=True)
            # the fused CPU Adam kernel reads gradients as laid out like their (contiguous) parameters;
            # autograd may return a transposed view (vmapped critics' weights)
            grads = [g.contiguous() for g in grads]
        if self.grad_hook is not None:
            grads = self.grad_hook(list(grads))
        if "actor" in groups:
            self._set_actor_lr()
        offset = 0
        for g in groups:
            n = len(self.params[g])
            self._optimizer_step(g, list(grads[offset : offset + n]))
            offset += n
        return result

    def _autocast_call(self, phase, batch, params):
        enabled = self.autocast_dtype is not None
        with torch.autocast(self.device_type, dtype=self.autocast_dtype or torch.bfloat16, enabled=enabled):
            return phase(batch, params)

    def _loss_params(self, groups, tensors: dict[str, list[Tensor]]) -> dict[str, TensorDictBase]:
        """The loss's parameter TensorDicts of ``groups`` with their trainable leaves replaced by ``tensors``."""
        params = {}
        for g in groups:
            td = self.param_tds[g]
            leaves = iter(tensors[g])
            params[GROUPS[g]] = TensorDict(
                {key: next(leaves) if _is_trainable(v) else v for key, v in td.items(True, True)},
                batch_size=td.batch_size,
            )
        return params

    def _optimizer_step(self, group: str, grads: list[Tensor]) -> None:
        """An Adam step with the settings and state the group's optimizer holds: eager, torch's fused
        kernel (one per group); compiled, :func:`~iql_torchrl.adam.adam_step`'s foreach ops, which
        inductor fuses into the graph (step count and learning rate stay tensors: no sync, no recompile)."""
        optimizer = self.optimizers[group]
        settings = optimizer.param_groups[0]
        states = [optimizer.state[p] for p in self.params[group]]
        tensors = (
            self.params[group], grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
        )
        steps = [s["step"] for s in states]
        options = {
            "lr": settings["lr"], "eps": settings["eps"], "weight_decay": settings["weight_decay"],
            "decoupled_weight_decay": settings["decoupled_weight_decay"],
        }
        if torch.compiler.is_compiling():
            adam_step(*tensors, steps, betas=settings["betas"], **options)
            return
        beta1, beta2 = settings["betas"]
        adam(*tensors, [], steps, fused=True, amsgrad=False, beta1=beta1, beta2=beta2, maximize=False, **options)

    def _set_actor_lr(self):
        if self.total_steps is not None:
            self.actor_lr.copy_(self.learning_rates["actor"] * cosine_decay(self.step, self.total_steps))

    def _finish(self, out: TensorDictBase) -> TensorDictBase:
        """Soft target update, step counter, non-finite bookkeeping; the detached metrics."""
        torch._foreach_lerp_(self.target_params, self.online_params, self.tau)
        bad = torch.stack([~torch.isfinite(out[name]).all() for name in LOSS_NAMES])
        first = bad.any() & (self.first_nonfinite_step < 0)
        self.first_nonfinite_step.copy_(torch.where(first, self.step, self.first_nonfinite_step))
        self.nonfinite_losses.copy_(torch.where(first, bad, self.nonfinite_losses))
        self.step.add_(1)
        metrics = out.detach()
        metrics.batch_size = torch.Size([])  # a SeedEnsemble's metrics are [num_seeds]-shaped
        metrics.set("actor_lr", self.actor_lr.clone())
        return metrics

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Everything a resumed run needs besides the loss's own parameters."""
        return {
            **{name: getattr(self, name).clone() for name in _STATE_TENSORS},
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Loads in place: the tensors the step holds stay the same objects (a compiled step keeps
        its graph, a CUDA graph keeps reading them)."""
        for name, opt in self.optimizers.items():
            learning_rates = [group["lr"] for group in opt.param_groups]
            held = {p: dict(opt.state[p]) for p in self.params[name]}
            opt.load_state_dict(state["optimizers"][name])
            for group, lr in zip(opt.param_groups, learning_rates):
                lr.copy_(group["lr"])
                group["lr"] = lr
            for param, tensors in held.items():
                loaded = opt.state[param]
                for key, tensor in tensors.items():  # older checkpoints hold a 0-dim step on any device
                    loaded[key] = tensor.copy_(loaded[key])
        for name in _STATE_TENSORS:  # after the optimizers: the saved actor_lr is the one in force
            getattr(self, name).copy_(state[name])

    def nonfinite_report(self) -> str | None:
        """``None`` while every loss has been finite, else which loss went non-finite at which step.

        Reads device state: call it when logging, not every step.
        """
        step = int(self.first_nonfinite_step)
        if step < 0:
            return None
        names = [name for name, bad in zip(LOSS_NAMES, self.nonfinite_losses.tolist()) if bad]
        return f"non-finite {', '.join(names)} at update step {step}"


def _make_optimizer(params, lr: float, name: str, weight_decay: float, device) -> torch.optim.Adam:
    """A ``torch.optim.Adam`` holding ``params``' state, with a tensor learning rate and state built now.

    A tensor learning rate lets the step change it (the actor's cosine) without recompiling; the
    state exists before the first step, so the compiled step never sees a lazy initialisation.
    """
    optimizer = torch.optim.Adam(
        params,
        lr=torch.tensor(lr, device=device),
        betas=BETAS,
        eps=EPS,
        weight_decay=weight_decay,
        decoupled_weight_decay=name == "adamw",
    )
    for p in params:
        optimizer.state[p] = {
            "step": torch.zeros((), dtype=torch.float32, device=device),
            "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
        }
    return optimizer


def _summed_losses(result) -> Tensor:
    out = result[0] if isinstance(result, tuple) else result
    return sum(out[name].sum() for name in LOSS_NAMES if name in out.keys())


def _networks(loss: IQLLoss):
    for name in ("actor_network", "qvalue_network", "value_network"):
        yield from getattr(loss, name).modules()


def _is_trainable(value) -> bool:
    return isinstance(value, torch.nn.Parameter) and value.requires_grad


def _trainable(params: TensorDictBase) -> list[Tensor]:
    return [p for p in params.values(True, True) if _is_trainable(p)]


def metrics_to_floats(metrics: TensorDict) -> dict[str, float]:
    """Host copies of a metrics TensorDict (one sync), for logging; per-seed entries are averaged."""
    return {key: float(value.float().mean()) for key, value in metrics.items()}
