"""The fused IQL update: gradients → Adam steps → cosine actor LR → soft target update, one function.

One call of :class:`IQLUpdate` is one gradient step of every network. The step is a plain
function of tensors (no ``.item()``, no Python branching on tensor values, no ``backward()``,
no ``optimizer.step()``), so the same code runs eager (gradients from ``torch.autograd.grad``)
or compiled as ONE graph (gradients from ``torch.func.grad``, which the compiler traces into the
same graph as the losses, the optimizers and the target update), ahead of time or replayed as a
CUDA graph: how it runs is :class:`~iql_torchrl.step.modes.StepRunner`'s job, not this module's.

Update order (``order``):

* ``"paper"`` (default) -- the official implementation: step V on its expectile loss, then the
  actor and the critics with the new V (``IQLLoss.value_phase`` then ``actor_critic_phase``);
* ``"summed"`` -- TorchRL's script: the gradient of the three losses summed, then every optimizer.

Random draws (batch indices) are made by the caller, outside the step, so eager, compiled and
vmapped runs see the same batches and a resumed run continues the same random stream.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Protocol

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor
from torch.optim.adam import adam

from iql_torchrl.step.compile_cache import CompiledStepCache, describe_objects
from iql_torchrl.step.eager_check import EagerCheck, tolerance
from iql_torchrl.step.precision import MIN_FEATURES, PRECISIONS, BF16Layers, bf16_cost, choose_precision, widest_layer
from iql_torchrl.objectives.checks import is_finite_number, nonfinite
from iql_torchrl.objectives.loss import TRAINED_NETWORKS
from iql_torchrl.step.modes import MODES, StepRunner, call_structure, check_mode, missing_compiler

__all__ = [
    "IQLUpdate", "cosine_decay", "MODES", "ORDERS", "OPTIMIZERS", "OPTIMIZER_GROUPS", "metrics_to_floats", "missing_compiler",
    "optimizer_settings_problem", "TrainableLoss",
]

ORDERS = ("paper", "summed")
OPTIMIZERS = ("adam", "adamw")
LOSS_NAMES = ("loss_value", "loss_actor", "loss_qvalue")
OPTIMIZER_GROUPS = TRAINED_NETWORKS  # one optimizer a network
_STATE_TENSORS = ("step", "actor_lr", "first_nonfinite_step", "nonfinite_losses")  # device state besides Adam's
BETAS, EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults, as in the paper's code


class TrainableLoss(Protocol):
    """What :class:`IQLUpdate` reads from the loss it trains: :class:`~iql_torchrl.IQLLoss` has it, and so
    has :class:`~iql_torchrl.objectives.ensemble.SeedEnsemble` (K seeds stacked).

    For each network the optimizer groups of :data:`OPTIMIZER_GROUPS` train (``value``, ``actor``, ``qvalue``): ``<name>_network``,
    the module (searched for dropout layers), and ``<name>_network_params``, its parameters (the trainable
    leaves get an optimizer); ``target_qvalue_network_params`` (the soft update's target); the phases, each
    evaluable at given parameters; and the claim on the target update (``claim_target_update()``: the step updates the targets itself).
    """

    value_network_params: TensorDictBase
    actor_network_params: TensorDictBase
    qvalue_network_params: TensorDictBase
    target_qvalue_network_params: TensorDictBase
    value_network: torch.nn.Module
    actor_network: torch.nn.Module
    qvalue_network: torch.nn.Module

    def parameters(self): ...

    def claim_target_update(self) -> None: ...

    def evaluate(self, tensordict: TensorDictBase, params: dict | None = None) -> TensorDictBase: ...

    def value_phase(self, tensordict: TensorDictBase, params: dict | None = None) -> tuple[TensorDictBase, Tensor]: ...

    def actor_critic_phase(self, tensordict: TensorDictBase, target_min_q: Tensor,
                           params: dict | None = None) -> TensorDictBase: ...


def optimizer_settings_problem(settings: dict[str, float | None]) -> tuple[str, str] | None:
    """The first of ``settings`` (``lr``, ``<network>_lr``, ``tau``, ``weight_decay``; None: unset) out of
    its range and what it must be, e.g. ``("tau", "in (0, 1], e.g. 0.005")``; None when all are valid."""
    valid = {
        "tau": (lambda v: 0 < v <= 1, "in (0, 1], e.g. 0.005"),
        "weight_decay": (lambda v: v >= 0, "a finite number >= 0"),
    }
    for name, value in settings.items():
        ok, requirement = valid.get(name, (lambda v: v > 0, "a finite number > 0, e.g. 3e-4"))
        if value is not None and not (is_finite_number(value) and ok(value)):
            return name, requirement
    return None


def _check_total_steps(total_steps) -> None:
    if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0):
        raise ValueError(f"total_steps must be a positive integer or None, got {total_steps!r}.")


def _entries(params: TensorDictBase) -> list[tuple[dict, str, object]]:
    """Every (mapping, key, value) of the nested TensorDict ``params``, sub-TensorDicts and leaves: a
    replaced parameter, or sub-TensorDict, is one whose mapping no longer holds it (a cheap check)."""
    td = getattr(params, "_param_td", params)  # TensorDictParams keeps its TensorDict here
    mapping = getattr(td, "_tensordict", None)
    if not isinstance(mapping, dict):  # another TensorDict type: not checked
        return []
    entries = []
    for key, value in mapping.items():
        entries.append((mapping, key, value))
        if isinstance(value, TensorDictBase):
            entries.extend(_entries(value))
    return entries


def _conversions(loss) -> int | None:
    """How many times ``loss`` has been converted (``.to()``, ``.double()``: ``nn.Module._apply``)."""
    return getattr(loss, "conversions", None)


def _layout(tensors: list[Tensor]) -> list[tuple]:
    return [(t.dtype, t.device) for t in tensors]


def cosine_decay(step: Tensor, total_steps: int | Tensor) -> Tensor:
    """The paper's actor learning-rate factor: 0.5·(1 + cos(π·min(step, T)/T)), from 1 down to 0."""
    progress = torch.minimum(step, torch.as_tensor(total_steps, device=step.device)).to(torch.float32) / total_steps
    return 0.5 * (1.0 + torch.cos(math.pi * progress))


class IQLUpdate:
    """One call = one IQL gradient step on a batch; returns a detached metrics TensorDict.

    Args:
        loss: the :class:`~iql_torchrl.IQLLoss` whose networks are trained (or a
            :class:`~iql_torchrl.objectives.ensemble.SeedEnsemble` of them): a :class:`TrainableLoss`.

    Keyword Args:
        total_steps (int): length of the run, for the actor's cosine learning-rate decay to 0.
            ``None`` keeps the actor's learning rate constant.
        lr (float): learning rate of every network (paper: 3e-4).
        actor_lr, qvalue_lr, value_lr (float, optional): per-network learning rates; ``None``
            uses ``lr``. The actor's cosine decay starts from ``actor_lr``.
        optimizer (str): ``"adam"`` (paper) or ``"adamw"`` (decoupled weight decay).
        weight_decay (float): weight decay of every network's parameters (default 0): L2 added
            to the gradient for Adam, decoupled for AdamW.
        tau (float): soft target update rate: target ← (1 − τ)·target + τ·online (paper: 0.005).
        order (str): ``"paper"`` or ``"summed"`` (see the module docstring).
        mode (str): ``"eager"``, ``"compile"`` or ``"cudagraphs"`` (needs CUDA).
        data (TensorDict, optional): the whole dataset on the training device. When given, the
            step takes a tensor of indices and gathers the batch itself (inside the graph).
        precision (str): ``"fp32"``; ``"bf16"``: the wide layers' matrix products (weight at least
            ``bf16_min_features`` in both dims) in bfloat16 with float32 accumulation, everything else
            float32 (:mod:`iql_torchrl.step.precision`); ``"auto"``: bf16 where this host's bf16 is
            measured to pay (``precision_reason`` says why). A forced bf16 that is slower here warns.
        bf16_min_features (int): under bf16, the smallest weight dimension computed in bf16 (1: every layer).
        grad_hook (callable, optional): called with each optimizer phase's list of gradients
            between the gradient and the optimizer step, returns the gradients to apply;
            data-parallel training averages them across processes here
            (:func:`iql_torchrl.runs.distributed.all_reduce_gradients`).
        compile_cache (path, optional): mode ``"compile"``: a folder where the step compiled ahead of
            time is kept, signed, for the next step built with the same settings and shapes (which then
            starts without compiling; :mod:`iql_torchrl.step.compile_cache`). ``None``: compile every time.
        eager_checks (int): modes ``"compile"`` and ``"cudagraphs"``: the call that compiles (or captures) a step
            and this many calls after it are also taken eagerly from the same state, and each network's
            parameters compared (:mod:`iql_torchrl.step.eager_check`); 0 turns the check off. A checked call
            costs about one eager step more.
        fall_back_to_eager (bool): when a checked call disagrees, warn and run eager from then on (that update
            is the eager step's) instead of raising :class:`~iql_torchrl.step.eager_check.StepMismatch`.

    The optimizers are ``torch.optim.Adam`` objects (``value_optimizer``, ``actor_optimizer``,
    ``qvalue_optimizer``) holding the state and learning rates, stepped through torch's functional
    ``adam`` (eager: fused; compiled: foreach and capturable) so the step stays one graph. A :class:`SeedEnsemble`'s losses have one entry per
    seed, summed before differentiation (the seeds share no parameters, so each gets its own
    gradient), and Adam, being elementwise, steps every seed independently.

    What the step reads from ``loss`` is :class:`TrainableLoss`.

    State kept on the device: ``step`` (int64), ``actor_lr`` (the current actor learning rate),
    and the first non-finite loss: ``first_nonfinite_step`` (−1 while all losses are finite) and
    ``nonfinite_losses`` (which of ``loss_value``, ``loss_actor``, ``loss_qvalue`` it was). The
    run reads them when it logs, so the step itself never syncs with the host.
    """

    def __init__(
        self,
        loss: TrainableLoss,
        *,
        total_steps: int | None = None,
        lr: float = 3e-4,
        actor_lr: float | None = None,
        qvalue_lr: float | None = None,
        value_lr: float | None = None,
        optimizer: str = "adam",
        weight_decay: float = 0.0,
        tau: float = 0.005,
        order: str = "paper",
        mode: str = "eager",
        data: TensorDictBase | None = None,
        precision: str = "fp32",
        bf16_min_features: int = MIN_FEATURES,
        grad_hook=None,
        compile_cache: str | Path | None = None,
        eager_checks: int = 2,
        fall_back_to_eager: bool = False,
    ):
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}.")
        device = next(loss.parameters()).device
        check_mode(mode, device.type, "IQLUpdate")  # before any work: how the step runs is the runner's
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}.")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
        if not (isinstance(bf16_min_features, int) and bf16_min_features >= 1):
            raise ValueError(f"bf16_min_features must be an int of at least 1, got {bf16_min_features!r}.")
        _check_total_steps(total_steps)
        learning_rates = {"value": value_lr, "actor": actor_lr, "qvalue": qvalue_lr}
        learning_rates = {name: lr if rate is None else rate for name, rate in learning_rates.items()}
        settings = {**{f"{g}_lr": r for g, r in learning_rates.items()}, "tau": tau, "weight_decay": weight_decay}
        if (problem := optimizer_settings_problem(settings)) is not None:
            name, requirement = problem
            raise ValueError(f"{name} must be {requirement}, got {settings[name]}.")
        self.loss = loss
        self.order = order
        self.data = data
        self.grad_hook = grad_hook
        self.device_type = device.type
        self.bf16_min_features = bf16_min_features
        self.precision, self.precision_reason = self._resolve_precision(precision, mode)
        self.step = torch.zeros((), dtype=torch.int64, device=device)
        # settings the step reads as 0-d tensors, so changing them between calls needs no recompilation:
        # the target update rate, the cosine's length (0: no decay) and the actor's learning rate before it
        self._tau, self._tau_value = torch.tensor(float(tau), device=device), tau
        self._total_steps = torch.zeros((), dtype=torch.int64, device=device)
        self.total_steps = total_steps
        self._actor_base_lr = torch.tensor(float(learning_rates["actor"]), device=device)
        self.first_nonfinite_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.nonfinite_losses = torch.zeros(len(LOSS_NAMES), dtype=torch.bool, device=device)

        # per group: the loss's parameter TensorDict, its trainable leaves, and an Adam holding their state
        self.param_tds = {group: getattr(loss, f"{group}_network_params") for group in OPTIMIZER_GROUPS}
        self.params = {group: _trainable(td) for group, td in self.param_tds.items()}
        self.optimizers = {
            group: _make_optimizer(self.params[group], learning_rates[group], optimizer, weight_decay, device)
            for group in OPTIMIZER_GROUPS
        }
        self.value_optimizer = self.optimizers["value"]
        self.actor_optimizer = self.optimizers["actor"]
        self.qvalue_optimizer = self.optimizers["qvalue"]
        self.actor_lr = self.actor_optimizer.param_groups[0]["lr"]
        self._lr_tensors = {group: opt.param_groups[0]["lr"] for group, opt in self.optimizers.items()}
        # said before the target parameters are read, which is when TorchRL warns about a missing updater
        loss.claim_target_update()
        self.target_params = list(loss.target_qvalue_network_params.values(True, True))
        self.online_params = list(loss.qvalue_network_params.values(True, True))
        self._layout = _layout(self._held_tensors())
        self._conversions = _conversions(loss)
        self._param_entries = {group: _entries(td) for group, td in self.param_tds.items()}

        self._dropouts = [m for m in _networks(loss) if isinstance(m, torch.nn.Dropout)]
        self.runner = StepRunner(
            self._paper_step if order == "paper" else self._summed_step, mode=mode,
            fullgraph=grad_hook is None, ahead_of_time=grad_hook is None, eager_random=bool(self._dropouts),
            specialisation=self._specialisation,
            cache=None if compile_cache is None or mode != "compile" else CompiledStepCache(compile_cache),
            description=self._compiled_step_description, device_type=device.type,
            check=EagerCheck(self._checked_networks, self._written_tensors, random=bool(self._dropouts),
                             tolerance=tolerance(self.precision)),
            check_calls=eager_checks, fall_back=fall_back_to_eager,
        )

    def _resolve_precision(self, precision: str, mode: str) -> tuple[str, str]:
        layer, seeds = widest_layer(self.loss, self.bf16_min_features)
        if precision == "auto":
            return choose_precision(self.device_type, mode != "eager", layer, stacked=seeds)[:2]
        if precision == "bf16" and (cost := bf16_cost(self.device_type, layer, compiled=mode != "eager",
                                                      stacked=seeds)) is not None:
            warnings.warn(f"IQLUpdate(precision='bf16'): {cost}.", UserWarning, stacklevel=3)
        return precision, "asked for"

    @property
    def mode(self) -> str:
        """How the step runs: ``"eager"``, ``"compile"`` or ``"cudagraphs"`` (``"eager"`` once a compiled step that
        failed its eager check fell back to it)."""
        return self.runner.mode

    @property
    def step_function(self):
        """The plain step, before any compilation (e.g. for ``torch._dynamo.explain``)."""
        return self.runner.step_function

    def __call__(self, batch_or_indices: TensorDictBase | Tensor) -> TensorDictBase:
        """One update. Pass a batch TensorDict, or indices into ``data`` when it was given."""
        self._check_held_tensors()
        return self.runner(batch_or_indices)

    @property
    def compilations(self) -> int:
        """How many times the step has been compiled (ahead of time, or loaded from the compile cache) so far."""
        return self.runner.compilations

    # ------------------------------------------------------------------ settings that may change between calls
    @property
    def tau(self) -> float:
        """The soft target update rate, in (0, 1]; may change between calls (``update.tau = 0.01``)."""
        return self._tau_value

    @tau.setter
    def tau(self, value: float) -> None:
        self._check_setting("tau", value)
        self._tau.fill_(value)
        self._tau_value = value

    @property
    def total_steps(self) -> int | None:
        """The length of the actor's cosine learning-rate decay (``None``: no decay); may change between calls."""
        total = int(self._total_steps)
        return total if total > 0 else None

    @total_steps.setter
    def total_steps(self, value: int | None) -> None:
        _check_total_steps(value)
        self._total_steps.fill_(0 if value is None else value)

    @property
    def learning_rates(self) -> dict[str, float]:
        """Each optimizer group's base learning rate (the actor's before its cosine decay)."""
        return {"value": float(self._lr_tensors["value"]), "actor": float(self._actor_base_lr),
                "qvalue": float(self._lr_tensors["qvalue"])}

    def set_learning_rate(self, group: str, lr: float) -> None:
        """Sets ``group``'s (``"value"``, ``"actor"``, ``"qvalue"``) learning rate, in place, so a compiled step
        reads it. The actor's is the base of its cosine decay (its current rate follows at the next step;
        at once with ``total_steps=None``). torch's LR schedulers, which change a tensor learning rate in
        place, work on ``value_optimizer`` and ``qvalue_optimizer``; the actor's rate is the cosine's."""
        if group not in OPTIMIZER_GROUPS:
            raise ValueError(f"group must be one of {tuple(OPTIMIZER_GROUPS)}, got {group!r}.")
        self._check_setting(f"{group}_lr", lr)
        if group == "actor":
            self._actor_base_lr.fill_(lr)
            if self.total_steps is None:
                self.actor_lr.fill_(lr)
        else:
            self._lr_tensors[group].fill_(lr)

    def set_actor_lr(self, lr: float | None = None) -> None:
        """Sets the actor's current learning rate (``None``: its base rate), in place, so a compiled step or a
        captured CUDA graph reads it; with ``total_steps=None`` it stays there."""
        if lr is None:
            self.actor_lr.copy_(self._actor_base_lr)
        else:
            self._check_setting("actor_lr", lr)
            self.actor_lr.fill_(lr)

    @staticmethod
    def _check_setting(name: str, value) -> None:
        if (problem := optimizer_settings_problem({name: value})) is not None:
            raise ValueError(f"{name} must be {problem[1]}, got {value!r}.")

    def _held_tensors(self) -> list[Tensor]:
        """The parameters the step trains and the target critics it updates."""
        return [*(p for group in OPTIMIZER_GROUPS for p in self.params[group]), *self.target_params]

    def _check_held_tensors(self) -> None:
        """Refuses a call after a change the step cannot follow: a learning rate replaced by a number (a
        compiled step reads the tensor it was built with), parameters moved to another dtype or device
        (their optimizer state was not), or a parameter tensor replaced in the loss (the optimizer holds
        the one it was built with). The same in every mode."""
        for group, opt in self.optimizers.items():
            if opt.param_groups[0]["lr"] is not self._lr_tensors[group]:
                raise RuntimeError(
                    f"IQLUpdate: the {group} optimizer's learning rate was replaced ({opt.param_groups[0]['lr']!r}); "
                    f"change it in place instead: update.set_learning_rate({group!r}, lr) (torch's LR schedulers "
                    "change it in place too).")
        if _conversions(self.loss) != self._conversions:  # .to() / .double() since the last check
            self._check_layout()
            self._conversions = _conversions(self.loss)
        for group in OPTIMIZER_GROUPS:
            if not all(held.get(key) is value for held, key, value in self._param_entries[group]):
                raise RuntimeError(
                    f"IQLUpdate: a parameter of the loss's {group} network was replaced by a new tensor after the "
                    "update was built (its optimizer trains the old one): load new values in place "
                    "(loss.load_state_dict(...), or param.data.copy_(...)), or build a new IQLUpdate.")

    def _checked_networks(self) -> dict[str, tuple[list[Tensor], Tensor]]:
        """What the eager check compares: each trained network's parameters and the target critics, with the
        learning rate that bounds their difference."""
        return {**{g: (self.params[g], self._lr_tensors[g]) for g in OPTIMIZER_GROUPS},
                "target_qvalue": (self.target_params, self._lr_tensors["qvalue"])}

    def _written_tensors(self) -> list[Tensor]:
        """Every tensor a call of the step may write: the networks' parameters and buffers, the target critics,
        the optimizers' state and the update's own counters."""
        tensors = [t for td in self.param_tds.values() for t in td.values(True, True)] + self.target_params
        for group in OPTIMIZER_GROUPS:
            tensors += [t for p in self.params[group] for t in self.optimizers[group].state[p].values()]
        return tensors + [getattr(self, name) for name in _STATE_TENSORS]

    def _check_layout(self) -> None:
        if _layout(self._held_tensors()) != self._layout:
            raise RuntimeError(
                "IQLUpdate: the loss's parameters moved to another dtype or device after the update was built "
                "(their optimizer state did not): move the loss first, then build the IQLUpdate.")

    def _compiled_step_description(self) -> dict:
        """Everything the compiled step bakes in besides its call signature, for the compile cache: the
        update's settings, every plain attribute and class source of the loss and its networks, and the
        structure of the parameters and optimizer state it reads."""
        return {
            "update": {"order": self.order, "precision": self.precision, "bf16_min_features": self.bf16_min_features,
                       "optimizers": {g: {k: v for k, v in opt.param_groups[0].items() if k not in ("params", "lr")}
                                      for g, opt in self.optimizers.items()}},
            "loss": describe_objects(self.loss),
            "tensors": [call_structure(td) for td in (*self.param_tds.values(), self.loss.target_qvalue_network_params)],
        }

    def _specialisation(self) -> tuple:
        """What the compiled step is specialised on besides its input: the structure of ``data``, the dropout
        layers' train/eval flags, and autocast."""
        return (
            call_structure(self.data),
            tuple(m.training for m in self._dropouts),
            torch.is_autocast_enabled(self.device_type),
        )

    # ------------------------------------------------------------------ the step
    def _paper_step(self, batch_or_indices):
        with torch.no_grad():  # inside, not a decorator: the decorator's frame is shared by every such function
            batch = self._batch(batch_or_indices)
            value_out, target_min_q = self._descend(("value",), batch, self.loss.value_phase)
            out = self._descend(
                ("actor", "qvalue"), batch, lambda td, params: self.loss.actor_critic_phase(td, target_min_q, params)
            )
            out.set("loss_value", value_out["loss_value"])
            return self._finish(out)

    def _summed_step(self, batch_or_indices):
        with torch.no_grad():
            batch = self._batch(batch_or_indices)
            out = self._descend(tuple(OPTIMIZER_GROUPS), batch, self.loss.evaluate)
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
                result = self._loss_call(phase, batch.copy(), self._loss_params(groups, tensors))
                return _summed_losses(result), result

            grads, result = torch.func.grad(objective, has_aux=True)({g: self.params[g] for g in groups})
            grads = [grad for g in groups for grad in grads[g]]
        else:
            with torch.enable_grad():
                result = self._loss_call(phase, batch, None)
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

    def _loss_call(self, phase, batch, params):
        if self.precision != "bf16":
            return phase(batch, params)
        with BF16Layers(self.bf16_min_features):
            return phase(batch, params)

    def _loss_params(self, groups, tensors: dict[str, list[Tensor]]) -> dict[str, TensorDictBase]:
        """The loss's parameter TensorDicts of ``groups`` with their trainable leaves replaced by ``tensors``."""
        params = {}
        for g in groups:
            td = self.param_tds[g]
            leaves = iter(tensors[g])
            params[g] = TensorDict(
                {key: next(leaves) if _is_trainable(v) else v for key, v in td.items(True, True)},
                batch_size=td.batch_size,
            )
        return params

    def _optimizer_step(self, group: str, grads: list[Tensor]) -> None:
        """An Adam step with the settings and state the group's optimizer holds, through torch's own functional
        ``adam``: eager, its fused kernel (one per group); compiled, its capturable foreach form, which the
        compiler traces into the graph (step count and learning rate stay tensors: no sync, no recompile)."""
        optimizer = self.optimizers[group]
        settings = optimizer.param_groups[0]
        states = [optimizer.state[p] for p in self.params[group]]
        beta1, beta2 = settings["betas"]
        adam(
            self.params[group], grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
            [s["step"] for s in states], lr=settings["lr"], beta1=beta1, beta2=beta2, eps=settings["eps"],
            weight_decay=settings["weight_decay"], decoupled_weight_decay=settings["decoupled_weight_decay"],
            amsgrad=False, maximize=False,
            **(dict(foreach=True, capturable=True) if torch.compiler.is_compiling() else dict(fused=True)),
        )

    def _set_actor_lr(self):
        # total_steps 0 (None) keeps the current rate: a branch on a tensor, so changing it never recompiles
        decayed = self._actor_base_lr * cosine_decay(self.step, self._total_steps.clamp(min=1))
        self.actor_lr.copy_(torch.where(self._total_steps > 0, decayed, self.actor_lr))

    def _finish(self, out: TensorDictBase) -> TensorDictBase:
        """Soft target update, step counter, non-finite bookkeeping; the detached metrics."""
        torch._foreach_lerp_(self.target_params, self.online_params, self._tau)
        bad = nonfinite([out[name] for name in LOSS_NAMES])
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


def _networks(loss: TrainableLoss):
    for name in OPTIMIZER_GROUPS:
        yield from getattr(loss, f"{name}_network").modules()


def _is_trainable(value) -> bool:
    return isinstance(value, torch.nn.Parameter) and value.requires_grad


def _trainable(params: TensorDictBase) -> list[Tensor]:
    return [p for p in params.values(True, True) if _is_trainable(p)]


def metrics_to_floats(metrics: TensorDict) -> dict[str, float]:
    """Host copies of a metrics TensorDict (one sync), for logging; per-seed entries are averaged."""
    return {key: float(value.float().mean()) for key, value in metrics.items()}
