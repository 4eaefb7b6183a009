"""An independent float64 implementation of IQL, to check the library against.

Nothing here imports ``iql_torchrl``: the networks are re-implemented from their weights, read by
name from the loss's parameter TensorDicts (plain MLPs: ``…weight`` / ``…bias`` per linear layer in
registration order, ReLU between them; the paper's Gaussian actor adds ``log_std``), and every
equation, Adam and the cosine schedule are written out by hand. Autograd supplies the gradients of
these hand-written losses.

:class:`ReferenceIQL` runs whole update steps:

* ``order="paper"``  -- Adam step of V on eq. (5); then the actor (eq. 7) and every critic (eq. 6)
  with the NEW V; then target ← target + τ_soft·(online − target);
* ``order="summed"`` -- all three losses with the old V, one Adam step of every network.

``variant`` names a plausible wrong implementation, so a test can show that it would have caught
it (see :data:`VARIANTS`).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # the paper's clip of the actor's log-std
MAX_WEIGHT = 100.0  # the paper's clamp of the AWR weight
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8

VARIANTS = {
    "stale_value_for_actor": "paper order, but the actor's advantage uses V before its step",
    "stale_value_for_critic": "paper order, but Q's target uses V(s') before V's step",
    "online_critics_for_value": "V's target and the advantage read the online critics, not the targets",
    "no_cosine": "the actor's learning rate stays constant",
    "sgd": "plain gradient descent instead of Adam",
    "no_target_update": "the target critics never move",
    "untanhed_mean": "the Gaussian actor's mean without the tanh",
    "unclipped_log_std": "the Gaussian actor's log-std without the clip to [-5, 2]",
}

Params = dict[tuple, Tensor]


# --------------------------------------------------------------------------- reading weights
def read(params) -> Params:
    """A TensorDict of parameters as ``{flat key: float64 copy}``, in registration order."""
    return {_flat(key): value.detach().to(torch.float64).clone() for key, value in params.items(True, True)}


def _flat(key) -> tuple:
    return key if isinstance(key, tuple) else (key,)


def linear_layers(params: Params, index: int | None = None) -> list[tuple[Tensor, Tensor]]:
    """The (W, b) pairs of an MLP, in order; ``index`` picks one critic from stacked parameters."""
    layers = []
    for key, weight in params.items():
        if key[-1] != "weight":
            continue
        bias = params[key[:-1] + ("bias",)]
        layers.append((weight, bias) if index is None else (weight[index], bias[index]))
    if not layers:
        raise KeyError(f"no '…weight' parameters among {list(params)}")
    return layers


def mlp(layers, x: Tensor) -> Tensor:
    for i, (weight, bias) in enumerate(layers):
        x = x @ weight.T + bias
        if i < len(layers) - 1:
            x = x.relu()
    return x


# --------------------------------------------------------------------------- the networks and equations
def value(params: Params, obs: Tensor) -> Tensor:
    return mlp(linear_layers(params), obs).squeeze(-1)


def critic(params: Params, index: int, obs: Tensor, action: Tensor) -> Tensor:
    return mlp(linear_layers(params, index), torch.cat([obs, action], -1)).squeeze(-1)


def num_critics(params: Params) -> int:
    return linear_layers(params)[0][0].shape[0]


def min_critic(params: Params, obs: Tensor, action: Tensor) -> Tensor:
    return torch.stack([critic(params, i, obs, action) for i in range(num_critics(params))]).min(0).values


def gaussian_log_prob(params: Params, obs: Tensor, action: Tensor, variant: str | None = None) -> Tensor:
    """The paper's actor: N(tanh(MLP(s)), exp(clip(log_std, −5, 2))²), log-density summed over dims."""
    log_std_key = next(key for key in params if key[-1] == "log_std")
    mlp_params = {key: value for key, value in params.items() if key != log_std_key}
    loc = mlp(linear_layers(mlp_params), obs)
    if variant != "untanhed_mean":
        loc = torch.tanh(loc)
    log_std = params[log_std_key]
    if variant != "unclipped_log_std":
        log_std = log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)
    z = (action - loc) / log_std.exp()
    return (-0.5 * z**2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def expectile_loss(diff: Tensor, expectile: float) -> Tensor:
    """Eq. (5), written as |τ − 1(u < 0)|·u²."""
    return (expectile - (diff < 0).to(diff.dtype)).abs() * diff**2


def cosine_lr(lr: float, step: int, total_steps: int | None) -> float:
    """The actor's learning rate at update ``step`` (0-based): lr·½(1 + cos(π·min(step, T)/T))."""
    if total_steps is None:
        return lr
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


class Adam:
    """Adam (Kingma & Ba, Algorithm 1), one moment pair per parameter name."""

    def __init__(self, params: Params, betas=ADAM_BETAS, eps=ADAM_EPS):
        self.betas, self.eps, self.t = betas, eps, 0
        self.m = {k: torch.zeros_like(v) for k, v in params.items()}
        self.v = {k: torch.zeros_like(v) for k, v in params.items()}

    def step(self, params: Params, grads: dict, lr: float) -> Params:
        self.t += 1
        b1, b2 = self.betas
        new = {}
        for key, p in params.items():
            g = grads[key]
            self.m[key] = b1 * self.m[key] + (1 - b1) * g
            self.v[key] = b2 * self.v[key] + (1 - b2) * g * g
            m_hat = self.m[key] / (1 - b1**self.t)
            v_hat = self.v[key] / (1 - b2**self.t)
            new[key] = p - lr * m_hat / (v_hat.sqrt() + self.eps)
        return new


def _grads(loss: Tensor, params: Params) -> dict:
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(params.items(), grads)}


def _leaves(params: Params) -> Params:
    return {k: v.detach().requires_grad_(True) for k, v in params.items()}


# --------------------------------------------------------------------------- whole update steps
class ReferenceIQL:
    """Float64 IQL with the paper's Gaussian actor, MLP critics and MLP value network.

    Start it from a loss's parameters (``ReferenceIQL.from_loss(loss, ...)``), call :meth:`step`
    with a batch TensorDict, compare :attr:`actor`, :attr:`critics`, :attr:`targets` and
    :attr:`value` (``{flat key: tensor}``, the loss's own names) with the loss's parameters.
    """

    def __init__(self, actor: Params, critics: Params, targets: Params, value_params: Params, *,
                 lr: float = 3e-4, tau: float = 0.005, total_steps: int | None = None, gamma: float = 0.99,
                 expectile: float = 0.7, temperature: float = 3.0, order: str = "paper",
                 variant: str | None = None):
        if variant is not None and variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; known: {sorted(VARIANTS)}")
        self.actor, self.critics, self.targets, self.value = actor, critics, targets, value_params
        self.lr, self.tau, self.total_steps, self.gamma = lr, tau, total_steps, gamma
        self.expectile, self.temperature, self.order, self.variant = expectile, temperature, order, variant
        self.adam = {"actor": Adam(actor), "critics": Adam(critics), "value": Adam(value_params)}
        self.steps_done = 0

    @classmethod
    def from_loss(cls, loss, **kwargs) -> "ReferenceIQL":
        return cls(read(loss.actor_network_params), read(loss.qvalue_network_params),
                   read(loss.target_qvalue_network_params), read(loss.value_network_params), **kwargs)

    # ------------------------------------------------------------------ the three losses
    def value_loss(self, value_params: Params, batch) -> Tensor:
        s, a = batch["observation"], batch["action"]
        q = min_critic(self.critics if self.variant == "online_critics_for_value" else self.targets, s, a)
        return expectile_loss(q - value(value_params, s), self.expectile).mean()

    def actor_loss(self, actor: Params, value_params: Params, batch) -> Tensor:
        s, a = batch["observation"], batch["action"]
        with torch.no_grad():
            q = min_critic(self.critics if self.variant == "online_critics_for_value" else self.targets, s, a)
            weight = torch.exp(self.temperature * (q - value(value_params, s))).clamp(max=MAX_WEIGHT)
        return -(weight * gaussian_log_prob(actor, s, a, self.variant)).mean()

    def critic_loss(self, critics: Params, value_params: Params, batch) -> Tensor:
        s, a = batch["observation"], batch["action"]
        with torch.no_grad():
            target = batch["reward"] + self.gamma * (1.0 - batch["terminated"]) * value(value_params, batch["next_observation"])
        return sum(((critic(critics, i, s, a) - target) ** 2).mean() for i in range(num_critics(critics)))

    def losses(self, batch) -> dict[str, float]:
        """The three losses at the current parameters (no step), all with the current V."""
        batch = as_float64(batch)
        with torch.no_grad():
            return {
                "loss_value": float(self.value_loss(self.value, batch)),
                "loss_actor": float(self.actor_loss(self.actor, self.value, batch)),
                "loss_qvalue": float(self.critic_loss(self.critics, self.value, batch)),
            }

    # ------------------------------------------------------------------ one update
    def step(self, batch) -> dict[str, float]:
        """One update; returns the losses as the step saw them (actor and Q after V's step, paper order)."""
        batch = as_float64(batch)
        old_value = self.value
        value_params = _leaves(self.value)
        loss_value = self.value_loss(value_params, batch)
        value_grads = _grads(loss_value, value_params)
        if self.order == "paper":
            new_value = self._descend("value", self.value, value_grads, self.lr)
            for_actor = old_value if self.variant == "stale_value_for_actor" else new_value
            for_critic = old_value if self.variant == "stale_value_for_critic" else new_value
        else:
            for_actor = for_critic = old_value
        actor, critics = _leaves(self.actor), _leaves(self.critics)
        loss_actor = self.actor_loss(actor, for_actor, batch)
        loss_qvalue = self.critic_loss(critics, for_critic, batch)
        actor_grads, critic_grads = _grads(loss_actor, actor), _grads(loss_qvalue, critics)
        if self.order != "paper":
            new_value = self._descend("value", self.value, value_grads, self.lr)
        actor_lr = self.lr if self.variant == "no_cosine" else cosine_lr(self.lr, self.steps_done, self.total_steps)
        self.actor = self._descend("actor", self.actor, actor_grads, actor_lr)
        self.critics = self._descend("critics", self.critics, critic_grads, self.lr)
        self.value = new_value
        if self.variant != "no_target_update":
            self.targets = {k: t + self.tau * (self.critics[k] - t) for k, t in self.targets.items()}
        self.steps_done += 1
        return {"loss_value": float(loss_value.detach()), "loss_actor": float(loss_actor.detach()),
                "loss_qvalue": float(loss_qvalue.detach()),
                "actor_lr": actor_lr}

    def _descend(self, name: str, params: Params, grads: dict, lr: float) -> Params:
        if self.variant == "sgd":
            return {k: p - lr * grads[k] for k, p in params.items()}
        return self.adam[name].step(params, grads, lr)


def as_float64(batch) -> dict[str, Tensor]:
    """The fields of a TorchRL transition batch as float64 tensors; reward and terminated as [B]."""
    if isinstance(batch, dict) and "next_observation" in batch:
        return batch
    return {
        "observation": batch["observation"].double(),
        "action": batch["action"].double(),
        "next_observation": batch["next", "observation"].double(),
        "reward": batch["next", "reward"].double().reshape(batch.batch_size),
        "terminated": batch["next", "terminated"].double().reshape(batch.batch_size),
    }


def max_abs_diff(a: Params, b) -> float:
    """Largest elementwise difference between two parameter sets with the same names."""
    b = read(b) if not isinstance(b, dict) else b
    if a.keys() != b.keys():
        raise KeyError(f"parameter names differ: {sorted(a.keys() ^ b.keys())}")
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# --------------------------------------------------------------------------- multi-step targets
def lambda_returns(reward, next_value, terminated, done, gamma: float, lmbda: float) -> list[float]:
    """TD(λ) targets along one trajectory, by the backward recursion (λ = 1 is TD(1)).

    G_t = r_t + γ·(1 − terminated_t)·V(s'_t)                          where the trajectory ends
          (done_t, or the last step of the batch);
    G_t = r_t + γ·(1 − terminated_t)·((1 − λ)·V(s'_t) + λ·G_{t+1})    otherwise.
    """
    returns = [0.0] * len(reward)
    for t in reversed(range(len(reward))):
        bootstrap = next_value[t]
        if not done[t] and t + 1 < len(reward):
            bootstrap = (1 - lmbda) * next_value[t] + lmbda * returns[t + 1]
        returns[t] = reward[t] + gamma * (1.0 - float(terminated[t])) * bootstrap
    return returns
