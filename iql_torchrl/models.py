"""The paper's networks, as TorchRL modules: actor, twin Q, V.

Paper (Kostrikov et al. 2022, appendix B): 2×256 ReLU MLPs everywhere; the actor is a Gaussian
with a tanh on the mean and a state-independent log-std clipped to [−5, 2], no tanh squashing
of samples; V optionally with LayerNorm; dropout on the actor for some domains.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from tensordict.nn import TensorDictModule
from torch import nn
from torch.distributions import Categorical
from torchrl.data import Bounded, TensorSpec
from torchrl.modules import ProbabilisticActor, ValueOperator
from torchrl.modules.distributions import IndependentNormal, NormalParamExtractor, OneHotCategorical, TanhNormal

__all__ = [
    "mlp",
    "GaussianPolicyHead",
    "make_actor",
    "make_qvalue_networks",
    "make_value_network",
    "make_iql_networks",
    "ACTOR_KINDS",
    "ConcatInputs",
]

ACTOR_KINDS = ("gaussian", "tanh_normal", "deterministic", "categorical", "one_hot")
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


def mlp(
    in_features: int,
    out_features: int,
    hidden_sizes: Sequence[int] = (256, 256),
    *,
    dropout: float = 0.0,
    layer_norm: bool = False,
) -> nn.Sequential:
    """Linear → [LayerNorm] → ReLU → [Dropout] per hidden layer, then a linear output layer."""
    layers: list[nn.Module] = []
    width = in_features
    for hidden in hidden_sizes:
        layers.append(nn.Linear(width, hidden))
        if layer_norm:
            layers.append(nn.LayerNorm(hidden))
        layers.append(nn.ReLU())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = hidden
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


class GaussianPolicyHead(nn.Module):
    """The paper's policy parameters: loc = tanh(MLP(s)), scale = exp(clip(log_std, −5, 2)).

    ``log_std`` is one learned vector, independent of the state, initialised at 0.
    """

    def __init__(self, obs_dim: int, action_dim: int, hidden_sizes: Sequence[int] = (256, 256), dropout: float = 0.0):
        super().__init__()
        self.net = mlp(obs_dim, action_dim, hidden_sizes, dropout=dropout)
        self.log_std = nn.Parameter(torch.zeros(action_dim))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.log_std)

    def forward(self, observation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc = torch.tanh(self.net(observation))
        scale = self.log_std.clamp(LOG_STD_MIN, LOG_STD_MAX).exp().expand_as(loc)
        return loc, scale


def make_actor(
    obs_dim: int,
    action_dim: int,
    *,
    kind: str = "gaussian",
    hidden_sizes: Sequence[int] = (256, 256),
    dropout: float = 0.0,
    observation_key="observation",
    action_key="action",
) -> TensorDictModule:
    """The policy, reading ``observation_key`` and writing ``action_key``.

    ``kind``: ``"gaussian"`` (the paper), ``"tanh_normal"`` (state-dependent std, tanh-squashed
    samples), ``"deterministic"`` (tanh(MLP(s))), ``"categorical"`` (index actions) or ``"one_hot"``
    (one-hot actions; ``action_dim`` is then the number of actions).
    Continuous actions live in [−1, 1]: the data loader scales dataset actions there.
    """
    if kind not in ACTOR_KINDS:
        raise ValueError(f"actor kind must be one of {ACTOR_KINDS}, got {kind!r}.")
    if kind == "deterministic":
        net = nn.Sequential(mlp(obs_dim, action_dim, hidden_sizes, dropout=dropout), nn.Tanh())
        return TensorDictModule(net, in_keys=[observation_key], out_keys=[action_key])
    if kind in ("categorical", "one_hot"):
        net = mlp(obs_dim, action_dim, hidden_sizes, dropout=dropout)
        module = TensorDictModule(net, in_keys=[observation_key], out_keys=["logits"])
        distribution = Categorical if kind == "categorical" else OneHotCategorical
        return ProbabilisticActor(module, in_keys=["logits"], out_keys=[action_key], distribution_class=distribution)
    spec = Bounded(-torch.ones(action_dim), torch.ones(action_dim), (action_dim,))
    if kind == "gaussian":
        head = GaussianPolicyHead(obs_dim, action_dim, hidden_sizes, dropout)
        distribution, distribution_kwargs = IndependentNormal, {}
    else:
        head = nn.Sequential(mlp(obs_dim, 2 * action_dim, hidden_sizes, dropout=dropout), NormalParamExtractor())
        distribution, distribution_kwargs = TanhNormal, {"low": -1.0, "high": 1.0}
    module = TensorDictModule(head, in_keys=[observation_key], out_keys=["loc", "scale"])
    return ProbabilisticActor(
        module,
        in_keys=["loc", "scale"],
        out_keys=[action_key],
        spec=spec,
        distribution_class=distribution,
        distribution_kwargs=distribution_kwargs,
    )


def make_qvalue_networks(
    obs_dim: int,
    action_dim: int,
    *,
    num_nets: int = 2,
    hidden_sizes: Sequence[int] = (256, 256),
    discrete: bool = False,
    layer_norm: bool = False,
    observation_key="observation",
    action_key="action",
) -> list[ValueOperator]:
    """``num_nets`` independently initialised critics writing ``state_action_value``.

    Continuous: Q(s, a) from [s, a], shape [*B, 1]. Discrete: Q(s, ·), one value per action.
    """
    if discrete:
        return [
            ValueOperator(
                mlp(obs_dim, action_dim, hidden_sizes, layer_norm=layer_norm),
                in_keys=[observation_key],
                out_keys=["state_action_value"],
            )
            for _ in range(num_nets)
        ]
    return [
        ValueOperator(
            ConcatInputs(mlp(obs_dim + action_dim, 1, hidden_sizes, layer_norm=layer_norm)),
            in_keys=[observation_key, action_key],
        )
        for _ in range(num_nets)
    ]


def make_value_network(
    obs_dim: int, *, hidden_sizes: Sequence[int] = (256, 256), layer_norm: bool = False, observation_key="observation"
) -> ValueOperator:
    """V(s), writing ``state_value`` of shape [*B, 1]."""
    return ValueOperator(mlp(obs_dim, 1, hidden_sizes, layer_norm=layer_norm), in_keys=[observation_key])


def make_iql_networks(
    obs_dim: int | TensorSpec,
    action_dim: int | TensorSpec,
    *,
    actor_kind: str = "gaussian",
    hidden_sizes: Sequence[int] = (256, 256),
    num_qvalue_nets: int = 2,
    actor_dropout: float = 0.0,
    value_layer_norm: bool = False,
) -> tuple[TensorDictModule, list[ValueOperator], ValueOperator]:
    """(actor, critics, value) with the paper's defaults, from dimensions or env specs.

    Pass them straight to :class:`~iql_torchrl.IQLLoss` (or ``DiscreteIQLLoss`` for the
    categorical and one-hot actors).
    """
    obs_dim, action_dim = _dim(obs_dim), _dim(action_dim)
    discrete = actor_kind in ("categorical", "one_hot")
    actor = make_actor(obs_dim, action_dim, kind=actor_kind, hidden_sizes=hidden_sizes, dropout=actor_dropout)
    critics = make_qvalue_networks(
        obs_dim, action_dim, num_nets=num_qvalue_nets, hidden_sizes=hidden_sizes, discrete=discrete
    )
    value = make_value_network(obs_dim, hidden_sizes=hidden_sizes, layer_norm=value_layer_norm)
    return actor, critics, value


class ConcatInputs(nn.Module):
    """Calls ``net`` on the concatenation of its inputs along the last dim."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    @property
    def in_features(self) -> int:
        """Width of the concatenated input (IQLLoss reads it to check the action size, as for TorchRL's MLP)."""
        return next(m for m in self.net.modules() if isinstance(m, nn.Linear)).in_features

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat(inputs, -1))


def _dim(dim_or_spec) -> int:
    """An int, or the feature size of a TensorSpec (the number of actions for discrete specs)."""
    if isinstance(dim_or_spec, int):
        return dim_or_spec
    space = getattr(dim_or_spec, "space", None)
    if space is not None and hasattr(space, "n"):
        return int(space.n)
    return int(dim_or_spec.shape[-1])
