"""The fused IQL update: losses → backward → Adam steps → cosine actor LR → soft target update.

One call of :class:`IQLUpdate` is one gradient step of every network. The step is a plain
function of tensors (no ``.item()``, no Python branching on tensor values), so the same code runs

* eager,
* under ``torch.compile`` (the whole step: losses, backward, optimizers and target update),
* as a CUDA graph on top of compile (tensordict's ``CudaGraphModule``; CUDA only).

Update order (``order``):

* ``"paper"`` (default) -- the official implementation: step V on its expectile loss, then the
  actor and the critics with the new V (``IQLLoss.value_phase`` then ``actor_critic_phase``);
* ``"summed"`` -- TorchRL's script: one backward of the three losses summed, then every optimizer.

Random draws (batch indices) are made by the caller, outside the step, so eager, compiled and
vmapped runs see the same batches and a resumed run continues the same random stream.
"""
from __future__ import annotations

import math

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor

from iql_torchrl.loss import IQLLoss

__all__ = ["IQLUpdate", "cosine_decay", "MODES", "ORDERS"]

MODES = ("eager", "compile", "cudagraphs")
ORDERS = ("paper", "summed")
LOSS_NAMES = ("loss_value", "loss_actor", "loss_qvalue")
_STATE_TENSORS = ("step", "actor_lr", "first_nonfinite_step", "nonfinite_losses")  # device state besides Adam's


def cosine_decay(step: Tensor, total_steps: int) -> Tensor:
    """The paper's actor learning-rate factor: 0.5·(1 + cos(π·min(step, T)/T)), from 1 down to 0."""
    progress = step.clamp(max=total_steps).to(torch.float32) / total_steps
    return 0.5 * (1.0 + torch.cos(math.pi * progress))


class IQLUpdate:
    """One call = one IQL gradient step on a batch; returns a detached metrics TensorDict.

    Args:
        loss: the :class:`~iql_torchrl.IQLLoss` whose networks are trained.

    Keyword Args:
        total_steps (int): length of the run, for the actor's cosine learning-rate decay to 0.
            ``None`` keeps the actor's learning rate constant.
        lr (float): Adam learning rate of every network (paper: 3e-4).
        tau (float): soft target update rate: target ← (1 − τ)·target + τ·online (paper: 0.005).
        order (str): ``"paper"`` or ``"summed"`` (see the module docstring).
        mode (str): ``"eager"``, ``"compile"`` or ``"cudagraphs"`` (needs CUDA).
        data (TensorDict, optional): the whole dataset on the training device. When given, the
            step takes a tensor of indices and gathers the batch itself (inside the graph).
        autocast_dtype (torch.dtype, optional): run the losses under ``torch.autocast`` with this
            dtype (e.g. ``torch.bfloat16``); parameters, optimizer state and the target update
            stay float32.
        grad_hook (callable, optional): called with each optimizer phase's parameters between
            backward and the optimizer step; data-parallel training averages gradients across
            processes here (:func:`iql_torchrl.distributed.all_reduce_gradients`).

    ``loss`` may also be a :class:`~iql_torchrl.distributed.SeedEnsemble`: its losses have one
    entry per seed, summed before backward (the seeds share no parameters, so each gets its own
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
        if mode == "cudagraphs" and not torch.cuda.is_available():
            raise RuntimeError("mode='cudagraphs' needs CUDA; use mode='compile' or 'eager' on this machine.")
        if total_steps is not None and total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}.")
        self.loss = loss
        self.total_steps = total_steps
        self.lr = lr
        self.tau = tau
        self.order = order
        self.mode = mode
        self.data = data
        self.grad_hook = grad_hook
        device = next(loss.parameters()).device
        self.autocast_dtype = autocast_dtype
        self.device_type = device.type
        self.step = torch.zeros((), dtype=torch.int64, device=device)
        self.first_nonfinite_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.nonfinite_losses = torch.zeros(len(LOSS_NAMES), dtype=torch.bool, device=device)

        def adam(params, lr):
            # a tensor learning rate lets the compiled step change it without recompiling
            return torch.optim.Adam(params, lr=lr, fused=True)

        self.value_params = _trainable(loss.value_network_params)
        self.actor_params = _trainable(loss.actor_network_params)
        self.critic_params = _trainable(loss.qvalue_network_params)
        self.value_optimizer = adam(self.value_params, torch.tensor(lr, device=device))
        self.actor_optimizer = adam(self.actor_params, torch.tensor(lr, device=device))
        self.actor_lr = self.actor_optimizer.param_groups[0]["lr"]
        self.critic_optimizer = adam(self.critic_params, torch.tensor(lr, device=device))
        self.optimizers = {"value": self.value_optimizer, "actor": self.actor_optimizer, "critic": self.critic_optimizer}
        self.target_params = list(loss.target_qvalue_network_params.values(True, True))
        for network in loss._has_update_associated:  # this step owns the target update (as SoftUpdate would)
            loss._has_update_associated[network] = True
        self.online_params = list(loss.qvalue_network_params.values(True, True))

        step_fn = self._paper_step if order == "paper" else self._summed_step
        if mode == "eager":
            self._step_fn = step_fn
        else:
            if any(isinstance(m, torch.nn.Dropout) for m in _networks(loss)):
                # inductor draws its own dropout masks unless told to use eager's generator:
                # with it, compiled and eager steps (and resumed runs) draw the same masks
                torch._inductor.config.fallback_random = True
            self._step_fn = torch.compile(step_fn)
            if mode == "cudagraphs":
                from tensordict.nn import CudaGraphModule

                self._step_fn = CudaGraphModule(self._step_fn, warmup=10)

    def __call__(self, batch_or_indices: TensorDictBase | Tensor) -> TensorDictBase:
        """One update. Pass a batch TensorDict, or indices into ``data`` when it was given."""
        return self._step_fn(batch_or_indices)

    # ------------------------------------------------------------------ the step
    def _batch(self, batch_or_indices):
        if isinstance(batch_or_indices, Tensor):
            if self.data is None:
                raise TypeError("IQLUpdate got indices but no data: pass data=... or call it with a batch.")
            return self.data[batch_or_indices]
        return batch_or_indices

    def _paper_step(self, batch_or_indices):
        batch = self._batch(batch_or_indices)
        self.value_optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            value_out, target_min_q = self.loss.value_phase(batch)
        value_out["loss_value"].sum().backward()
        self._reduce_gradients(self.value_params)
        self.value_optimizer.step()

        self.actor_optimizer.zero_grad(set_to_none=True)
        self.critic_optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            out = self.loss.actor_critic_phase(batch, target_min_q)
        (out["loss_actor"] + out["loss_qvalue"]).sum().backward()
        self._reduce_gradients(self.actor_params + self.critic_params)
        self._set_actor_lr()
        self.actor_optimizer.step()
        self.critic_optimizer.step()
        out.set("loss_value", value_out["loss_value"])
        return self._finish(out)

    def _summed_step(self, batch_or_indices):
        batch = self._batch(batch_or_indices)
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            out = self.loss(batch)
        (out["loss_value"] + out["loss_actor"] + out["loss_qvalue"]).sum().backward()
        self._reduce_gradients(self.value_params + self.actor_params + self.critic_params)
        self._set_actor_lr()
        for optimizer in self.optimizers.values():
            optimizer.step()
        return self._finish(out)

    def _autocast(self):
        return torch.autocast(self.device_type, dtype=self.autocast_dtype or torch.bfloat16, enabled=self.autocast_dtype is not None)

    def _reduce_gradients(self, params):
        if self.grad_hook is not None:
            self.grad_hook(params)

    def _set_actor_lr(self):
        if self.total_steps is not None:
            self.actor_lr.copy_(self.lr * cosine_decay(self.step, self.total_steps))

    def _finish(self, out: TensorDictBase) -> TensorDictBase:
        """Soft target update, step counter, non-finite bookkeeping; the detached metrics."""
        with torch.no_grad():
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
        for name in _STATE_TENSORS:
            getattr(self, name).copy_(state[name])
        for name, opt in self.optimizers.items():
            learning_rates = [group["lr"] for group in opt.param_groups]
            opt.load_state_dict(state["optimizers"][name])
            for group, lr in zip(opt.param_groups, learning_rates):  # keep the tensors the step holds
                lr.copy_(group["lr"])
                group["lr"] = lr

    def nonfinite_report(self) -> str | None:
        """``None`` while every loss has been finite, else which loss went non-finite at which step.

        Reads device state: call it when logging, not every step.
        """
        step = int(self.first_nonfinite_step)
        if step < 0:
            return None
        names = [name for name, bad in zip(LOSS_NAMES, self.nonfinite_losses.tolist()) if bad]
        return f"non-finite {', '.join(names)} at update step {step}"


def _networks(loss: IQLLoss):
    for name in ("actor_network", "qvalue_network", "value_network"):
        yield from getattr(loss, name).modules()


def _trainable(params: TensorDictBase) -> list[Tensor]:
    return [p for p in params.values(True, True) if isinstance(p, torch.nn.Parameter) and p.requires_grad]


def metrics_to_floats(metrics: TensorDict) -> dict[str, float]:
    """Host copies of a metrics TensorDict (one sync), for logging; per-seed entries are averaged."""
    return {key: float(value.float().mean()) for key, value in metrics.items()}
