"""IQL's update step: the losses' gradients → Adam → the actor's cosine learning rate → soft target update.

One call of :class:`IQLUpdate` is one gradient step of every network, a plain function of tensors (no
``.item()``, no branching on tensor values, no ``backward()``), so the same code runs eager (gradients from
``torch.autograd.grad``) or compiled as one graph (``torch.func.grad``, traced with the losses, the optimizers
and the target update); how it runs is :class:`~iql_torchrl.step.modes.StepRunner`'s job.

``order="paper"`` (default) steps V on its expectile loss, then the actor and the critics with the new V, as
the official implementation; ``"summed"``, as TorchRL's script, differentiates the three losses summed. Batch
indices are drawn by the caller, so eager, compiled and vmapped runs (and a resumed one) see the same batches.
"""
from __future__ import annotations

import contextlib
from typing import Protocol

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor

from iql_torchrl.objectives.checks import nonfinite
from iql_torchrl.objectives.loss import TRAINED_NETWORKS
from iql_torchrl.step.arguments import OPTIMIZERS, ORDERS, check_arguments, optimizer_settings_problem
from iql_torchrl.step.guards import HeldTensors
from iql_torchrl.step.live_settings import LiveSettings, cosine_decay
from iql_torchrl.step.modes import MODES, missing_compiler
from iql_torchrl.step.optimizers import adam_step, fused_in_graph, load_in_place, make_adam
from iql_torchrl.precision_choice import MIN_FEATURES, resolve_precision
from iql_torchrl.step.precision import BF16Layers, BiasApart
from iql_torchrl.step.wiring import STATE_TENSORS, build_runner

__all__ = [
    "IQLUpdate", "cosine_decay", "MODES", "ORDERS", "OPTIMIZERS", "OPTIMIZER_GROUPS", "metrics_to_floats", "missing_compiler",
    "optimizer_settings_problem", "TrainableLoss",
]

LOSS_NAMES = ("loss_value", "loss_actor", "loss_qvalue")
OPTIMIZER_GROUPS = TRAINED_NETWORKS  # one optimizer a network


class TrainableLoss(Protocol):
    """What :class:`IQLUpdate` reads from the loss it trains (:class:`~iql_torchrl.IQLLoss`, or a
    :class:`~iql_torchrl.objectives.ensemble.SeedEnsemble` of K seeds): per network, its module (searched for
    dropout) and parameters (the trainable leaves get an Adam); the target critics; the phases, each evaluable
    at given parameters (network name → a dict of its leaves by key); ``claim_target_update()`` (the step
    updates the targets). Optionally TorchRL's ``tensor_keys``: the ``priority`` and ``log_prob`` entries the
    loss writes into the batch, which the step hands on to its caller's batch.
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


class IQLUpdate(LiveSettings):
    """One call = one IQL gradient step on a batch; returns a detached metrics TensorDict.

    Args:
        loss: the :class:`~iql_torchrl.IQLLoss` whose networks are trained (or a
            :class:`~iql_torchrl.objectives.ensemble.SeedEnsemble` of them): a :class:`TrainableLoss`.

    Keyword Args:
        total_steps (int): length of the actor's cosine learning-rate decay to 0; ``None``: constant.
        lr (float): every network's learning rate (paper: 3e-4); ``actor_lr``, ``qvalue_lr``, ``value_lr``
            override it per network (the actor's cosine decays from ``actor_lr``).
        optimizer (str): ``"adam"`` (paper) or ``"adamw"``; ``weight_decay``: L2 added to the gradient for
            Adam, decoupled for AdamW (default 0).
        tau (float): soft target update rate: target ← (1 − τ)·target + τ·online (paper: 0.005).
        order (str): ``"paper"`` or ``"summed"`` (see the module docstring).
        mode (str): ``"eager"``, ``"compile"`` or ``"cudagraphs"`` (CUDA): :mod:`iql_torchrl.step.modes`.
        data (TensorDict, optional): the whole dataset on the training device; the step then takes indices
            and gathers the batch itself (inside the graph).
        precision (str): ``"fp32"``, ``"bf16"`` (layers at least ``bf16_min_features`` wide multiply in
            bfloat16) or ``"auto"`` (bf16 where it pays here; ``precision_reason`` says why).
        grad_hook (callable, optional): takes and returns each phase's gradients before the optimizers
            (data-parallel training averages them across processes here).
        eager_checks (int): compiled modes: the call that compiles (or captures) a step and this many after
            it are also taken eagerly and compared (:mod:`iql_torchrl.step.eager_check`); 0: none.
        fall_back_to_eager (bool): a checked call that disagrees warns and the step runs eager from then on,
            instead of raising :class:`~iql_torchrl.step.eager_check.StepMismatch`.

    ``value_optimizer``, ``actor_optimizer``, ``qvalue_optimizer``: ``torch.optim.Adam`` objects holding the
    state. On the device, read when a run logs: ``step``, ``actor_lr``, ``first_nonfinite_step`` (−1 while every
    loss is finite) and ``nonfinite_losses``.
    """

    def __init__(self, loss: TrainableLoss, *, total_steps: int | None = None, lr: float = 3e-4,
                 actor_lr: float | None = None, qvalue_lr: float | None = None, value_lr: float | None = None,
                 optimizer: str = "adam", weight_decay: float = 0.0, tau: float = 0.005, order: str = "paper",
                 mode: str = "eager", data: TensorDictBase | None = None, precision: str = "fp32",
                 bf16_min_features: int = MIN_FEATURES, grad_hook=None, eager_checks: int = 2, fall_back_to_eager: bool = False):
        device = next(loss.parameters()).device
        rates = {"value": value_lr, "actor": actor_lr, "qvalue": qvalue_lr}
        rates = {group: lr if rate is None else rate for group, rate in rates.items()}
        check_arguments(order=order, mode=mode, device_type=device.type, optimizer=optimizer, precision=precision,
                        bf16_min_features=bf16_min_features, total_steps=total_steps, tau=tau,
                        weight_decay=weight_decay, learning_rates=rates)
        self.loss, self.order, self.data, self.grad_hook = loss, order, data, grad_hook
        self.bf16_min_features = bf16_min_features
        self.precision, self.precision_reason = resolve_precision(precision, loss, device.type, mode != "eager",
                                                                  bf16_min_features)
        self.step = torch.zeros((), dtype=torch.int64, device=device)
        self.first_nonfinite_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.nonfinite_losses = torch.zeros(len(LOSS_NAMES), dtype=torch.bool, device=device)
        # per network: the loss's parameters, its leaves by key, its trainable leaves' keys and tensors, an Adam
        self.param_tds = {group: getattr(loss, f"{group}_network_params") for group in OPTIMIZER_GROUPS}
        self.leaves = {group: dict(td.items(True, True)) for group, td in self.param_tds.items()}
        self.trainable_keys = {group: [key for key, value in leaves.items() if _is_trainable(value)]
                               for group, leaves in self.leaves.items()}
        self.params = {group: [self.leaves[group][key] for key in keys] for group, keys in self.trainable_keys.items()}
        self.optimizers = {group: make_adam(self.params[group], rates[group], optimizer, weight_decay, device)
                           for group in OPTIMIZER_GROUPS}
        self.value_optimizer, self.actor_optimizer, self.qvalue_optimizer = (
            self.optimizers[group] for group in ("value", "actor", "qvalue"))
        self.fused_adam = fused_in_graph(device.type, self.precision, getattr(loss, "num_seeds", 1))
        super().__init__(tau=tau, total_steps=total_steps, actor_lr=rates["actor"], optimizers=self.optimizers,
                         device=device)
        loss.claim_target_update()  # before the targets are read, which is when TorchRL warns about no updater
        self.target_leaves = dict(loss.target_qvalue_network_params.items(True, True))
        self.target_params = list(self.target_leaves.values())
        self.online_params = list(loss.qvalue_network_params.values(True, True))
        self.held = HeldTensors(loss, self.param_tds, self.optimizers,
                                [*(p for params in self.params.values() for p in params), *self.target_params])
        self.runner = build_runner(self, mode=mode, grad_hook=grad_hook, eager_checks=eager_checks,
                                   fall_back_to_eager=fall_back_to_eager)

    @property
    def mode(self) -> str:
        """``"eager"``, ``"compile"`` or ``"cudagraphs"`` (``"eager"`` once a compiled step fell back to it)."""
        return self.runner.mode

    @property
    def step_function(self):
        """The plain step, before any compilation (e.g. for ``torch._dynamo.explain``)."""
        return self.runner.step_function

    @property
    def compilations(self) -> int:
        """How many times the step has been traced (or a CUDA graph captured) so far."""
        return self.runner.compilations

    def __call__(self, batch_or_indices: TensorDictBase | Tensor) -> TensorDictBase:
        """One update, of a batch TensorDict or of indices into ``data``. A batch receives, in every mode, what the
        loss writes into the batch it evaluates, as TorchRL's losses do: each transition's TD error under the priority
        key (``"td_error"``, which a prioritized replay buffer reads) and its log-probability (``"_log_prob"``)."""
        self.held.check()
        if not isinstance(batch_or_indices, TensorDictBase):
            return self.runner(batch_or_indices)["metrics"]
        # the step never reads these entries: left out, a batch passed again is the same call to a compiled step
        out = self.runner(batch_or_indices.exclude(*_batch_outputs(self.loss)))
        batch_or_indices.update(out["batch"])
        return out["metrics"]

    # ------------------------------------------------------------------ the step
    def _paper_step(self, batch_or_indices):
        with torch.no_grad():  # inside, not a decorator: the decorator's frame is shared by every such function
            batch = self._batch(batch_or_indices)
            value_out, target_min_q, _ = self._descend(("value",), batch, self.loss.value_phase)
            out, _, written = self._descend(
                ("actor", "qvalue"), batch, lambda td, params: self.loss.actor_critic_phase(td, target_min_q, params))
            out["loss_value"] = value_out["loss_value"]
            return self._finish(out, written)

    def _summed_step(self, batch_or_indices):
        with torch.no_grad():
            batch = self._batch(batch_or_indices)
            out, _, written = self._descend(tuple(OPTIMIZER_GROUPS), batch, self.loss.evaluate)
            return self._finish(out, written)

    def _batch(self, batch_or_indices):
        if isinstance(batch_or_indices, Tensor):
            if self.data is None:
                raise TypeError("IQLUpdate got indices but no data: pass data=... or call it with a batch.")
            return self.data[batch_or_indices]
        return batch_or_indices

    def _descend(self, groups: tuple[str, ...], batch: TensorDictBase, phase):
        """Differentiates ``phase``'s summed losses w.r.t. ``groups`` and steps their optimizers. ``phase(batch,
        params)`` (params ``None``: the loss's own; else each network's leaves by key) returns a TensorDict, or that
        and a tensor. Returns its entries, the tensor and what it wrote into the batch."""

        def objective(tensors):
            scratch = batch.copy()  # the loss writes into the batch it evaluates: the writes are returned instead
            params = None if tensors is None else {"target_qvalue": self.target_leaves, **self.leaves, **{
                g: {**self.leaves[g], **dict(zip(self.trainable_keys[g], tensors[g]))} for g in groups}}
            result = self._loss_call(phase, scratch, params)
            out, *extra = result if isinstance(result, tuple) else (result,)  # torch.func.grad's aux holds no None
            out = dict(out.items(include_nested=True, leaves_only=True))
            written = {key: scratch.get(key) for key in _batch_outputs(self.loss) if key in scratch.keys(True)}
            return sum(out[name].sum() for name in LOSS_NAMES if name in out), (out, written, *extra)

        if torch.compiler.is_compiling():  # torch.func.grad traces into the one graph
            grads, (out, written, *extra) = torch.func.grad(objective, has_aux=True)(
                {g: self.params[g] for g in groups})
            grads = [grad for g in groups for grad in grads[g]]
        else:  # eager, autograd has no functional wrappers to pay for
            with torch.enable_grad():
                total, (out, written, *extra) = objective(None)
                params = [p for g in groups for p in self.params[g]]
                grads = torch.autograd.grad(total, params, allow_unused=True, materialize_grads=True)
        if self.grad_hook is not None:
            grads = self.grad_hook(list(grads))
        if "actor" in groups:
            self._follow_cosine(self.step)
        offset = 0
        for g in groups:
            self._optimizer_step(g, list(grads[offset:offset + len(self.params[g])]))
            offset += len(self.params[g])
        return out, (extra[0] if extra else None), written

    def _loss_call(self, phase, batch, params):
        bias_apart = self.step.device.type == "cpu" and torch.compiler.is_compiling()
        with BiasApart() if bias_apart else contextlib.nullcontext():
            if self.precision != "bf16":
                return phase(batch, params)
            with BF16Layers(self.bf16_min_features):
                return phase(batch, params)

    def _optimizer_step(self, group: str, grads: list[Tensor]) -> None:
        adam_step(self.optimizers[group], self.params[group], grads, fused=self.fused_adam)

    def _finish(self, out: dict, written: dict) -> TensorDictBase:
        """Soft target update, step counter, non-finite bookkeeping; the detached metrics and the batch's entries."""
        torch._foreach_lerp_(self.target_params, self.online_params, self._tau)
        bad = nonfinite([out[name] for name in LOSS_NAMES])
        first = bad.any() & (self.first_nonfinite_step < 0)
        self.first_nonfinite_step.copy_(torch.where(first, self.step, self.first_nonfinite_step))
        self.nonfinite_losses.copy_(torch.where(first, bad, self.nonfinite_losses))
        self.step.add_(1)
        metrics = {name: value.detach() for name, value in out.items()}
        metrics["actor_lr"] = self.actor_lr.clone()
        return TensorDict({"metrics": metrics, "batch": written}, batch_size=[])

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Everything a resumed run needs besides the loss's own parameters."""
        return {**{name: getattr(self, name).clone() for name in STATE_TENSORS},
                "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Loads in place: the tensors the step holds stay the same objects (a compiled step keeps its graph, a CUDA
        graph keeps reading them)."""
        for name, opt in self.optimizers.items():
            load_in_place(opt, self.params[name], state["optimizers"][name])
        for name in STATE_TENSORS:  # after the optimizers: the saved actor_lr is the one in force
            getattr(self, name).copy_(state[name])

    def nonfinite_report(self) -> str | None:
        """``None`` while every loss has been finite, else which loss went non-finite at which step (reads device
        state: call it when logging, not every step)."""
        step = int(self.first_nonfinite_step)
        if step < 0:
            return None
        names = [name for name, bad in zip(LOSS_NAMES, self.nonfinite_losses.tolist()) if bad]
        return f"non-finite {', '.join(names)} at update step {step}"


def _batch_outputs(loss: TrainableLoss) -> tuple:
    """The entries a loss writes into the batch it evaluates: TorchRL's priority key and the log-probabilities
    (none for a loss without ``tensor_keys``, such as vmapped seeds, whose writes stay inside ``vmap``)."""
    keys = getattr(loss, "tensor_keys", None)
    return tuple(key for key in (getattr(keys, "priority", None), getattr(keys, "log_prob", None)) if key is not None)


def _is_trainable(value) -> bool:
    return isinstance(value, torch.nn.Parameter) and value.requires_grad


def metrics_to_floats(metrics: TensorDict) -> dict[str, float]:
    """Host copies of a metrics TensorDict (one sync), for logging; per-seed entries are averaged."""
    return {key: float(value.float().mean()) for key, value in metrics.items()}
