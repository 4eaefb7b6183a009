"""The paper's networks, as TorchRL modules: actor, twin Q, V.

Paper (Kostrikov et al. 2022, appendix B): 2×256 ReLU MLPs everywhere; the actor is a Gaussian
with a tanh on the mean and a state-independent log-std clipped to [−5, 2], no tanh squashing
of samples; V optionally with LayerNorm; dropout on the actor for some domains.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModule
from torch import nn
from torch.distributions import Categorical
from torchrl.data import Bounded, TensorSpec
from torchrl.modules import MLP, ProbabilisticActor, ValueOperator
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
    "concatenated_input_width",
    "critic_copies",
    "own_critic_parameters",
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

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat(inputs, -1))


def concatenated_input_width(network: nn.Module) -> int | None:
    """The width of a network's input layer where its input is known to be its ``in_keys`` concatenated:
    a TensorDictModule around TorchRL's ``MLP`` or around :class:`ConcatInputs` of an ``nn.Sequential``
    starting with ``Linear``. ``None`` for any other network: an ``in_features`` attribute of a module of
    the user's may mean something else."""
    module = network.module if isinstance(network, TensorDictModule) else None
    if type(module) is MLP:
        width = module.in_features
    elif type(module) is ConcatInputs and isinstance(module.net, nn.Sequential) and len(module.net) \
            and type(module.net[0]) is nn.Linear:
        width = module.net[0].in_features
    else:
        return None
    return width if isinstance(width, int) and width > 0 else None


# --------------------------------------------------------------------------- the critics a loss trains
def critic_copies(qvalue_network: nn.Module | Sequence[nn.Module], num_qvalue_nets: int, shared=None) -> list:
    """The ``num_qvalue_nets`` critics a loss trains, as modules whose weights they start from.

    A list is used as given, except that a module listed again stands for a fresh copy of it (as
    below): ``[critic, critic]`` gives two independent critics, never one critic twice. One module is
    copy 0 with its weights; copies 1…N−1 are deep copies re-initialised by every
    ``reset_parameters`` they hold. Parameters in ``shared`` (the actor's, with ``separate_losses``)
    stay shared by all copies. A parameter no ``reset_parameters`` reaches would leave a copy equal
    to its original (the min over critics would do nothing): that is a ``ValueError``.
    """
    if isinstance(qvalue_network, (list, tuple)):
        if len(qvalue_network) != num_qvalue_nets:
            raise ValueError(f"Got {len(qvalue_network)} Q networks but num_qvalue_nets={num_qvalue_nets}.")
        critics = []
        for critic in qvalue_network:
            repeated = any(critic is earlier for earlier in qvalue_network[: len(critics)])
            critics.append(_fresh_copy(critic, num_qvalue_nets, shared) if repeated else critic)
        return critics
    return [qvalue_network] + [_fresh_copy(qvalue_network, num_qvalue_nets, shared) for _ in range(num_qvalue_nets - 1)]


def _fresh_copy(critic: nn.Module, num_qvalue_nets: int, shared) -> nn.Module:
    """A deep copy of ``critic`` re-initialised by its modules' ``reset_parameters`` (``shared`` stays shared)."""
    shared_ids = {id(p) for p in shared or ()}
    fresh = copy.deepcopy(critic, memo={id(p): p for p in shared or ()})
    reached = set()
    for module in fresh.modules():
        holds_shared = any(id(p) in shared_ids for p in module.parameters())
        if hasattr(module, "reset_parameters") and module is not fresh and not holds_shared:
            module.reset_parameters()
            reached.update(id(p) for p in module.parameters(recurse=False))
    for (name, new), old in zip(fresh.named_parameters(), critic.parameters()):
        if id(new) not in shared_ids and id(new) not in reached and torch.equal(new, old):
            raise ValueError(
                f"Cannot initialise {num_qvalue_nets} independent critics from one module: its "
                f"parameter {name!r} is not reset by any reset_parameters(), so every copy would "
                "hold the same values and the min over critics would do nothing. Pass a list of "
                f"{num_qvalue_nets} critics, distinct modules (e.g. make_qvalue_networks(..., num_nets="
                f"{num_qvalue_nets})) instead."
            )
    return fresh


def own_critic_parameters(
    params: TensorDictBase, critics: Sequence[nn.Module], *, detached: Iterable = (), elsewhere: Iterable = ()
) -> None:
    """Makes each entry of the critics' stacked ``[N, …]`` parameters ``params`` the loss's own, in place.

    TensorDict stacks N critics' parameters into new tensors, except a tensor that every critic
    holds (one module, N = 1; a trunk the critics share): that entry is an expanded *view*, which no
    optimizer sees and no loss trains. Each such entry becomes a parameter of its own: with one
    critic, a view of the module's own tensor (the module trains in place, as in TorchRL), unless
    another network also holds that tensor (``elsewhere``: the actor's or V's), which gets a copy;
    with several critics, a copy per critic. Parameters in ``detached`` (shared with the actor under
    ``separate_losses``) are read by the critics without gradient: detached views of the actor's.
    """
    detached_ids, elsewhere_ids = {id(p) for p in detached}, {id(p) for p in elsewhere}
    n = len(critics)
    sources = dict(critics[0].named_parameters())
    with params.unlock_():
        for name, source in sources.items():
            key = tuple(name.split("."))
            if id(source) in detached_ids:
                params.set(key, source.data.expand(n, *source.shape))
            elif not isinstance(params.get(key), nn.Parameter):
                alone = n == 1 and id(source) not in elsewhere_ids
                values = source.data.unsqueeze(0) if alone else params.get(key).detach().clone()
                params.set(key, nn.Parameter(values))


def _dim(dim_or_spec) -> int:
    """An int, or the feature size of a TensorSpec (the number of actions for discrete specs)."""
    if isinstance(dim_or_spec, int):
        return dim_or_spec
    space = getattr(dim_or_spec, "space", None)
    if space is not None and hasattr(space, "n"):
        return int(space.n)
    return int(dim_or_spec.shape[-1])
