"""IQLLoss: the three objectives of Implicit Q-Learning (Kostrikov, Nair & Levine, ICLR 2022).

The paper's equations each live in one function of :mod:`iql_torchrl.objectives.equations`:
:func:`expectile_loss` (eq. 5), :func:`bellman_target` (eq. 6), :func:`awr_weight` (eq. 7), and each
whole objective the loss computes (:func:`value_objective`, :func:`critic_objective`,
:func:`actor_objective`). Input checks live in :mod:`iql_torchrl.objectives.checks`, the critic copies in
:mod:`iql_torchrl.objectives.networks`.

:class:`IQLLoss` wires them to TorchRL networks and TensorDicts.  It accepts the same
constructor arguments, keys and attributes as :class:`torchrl.objectives.IQLLoss`, so an
existing TorchRL script can swap the import; the defaults are the paper's.

Network evaluations per batch (each one call; the critic ensemble is one vmapped call, or, for plain
MLP critics, one batched matmul per layer: :mod:`iql_torchrl.objectives.plain_mlp`):

========================== =========== ====== ======= ================ ======
call                        target Q    V(s)   V(s')   online Q         actor
========================== =========== ====== ======= ================ ======
``forward``                 1           1      1       1                1
``value_phase``             1           1      0       0                0
``actor_critic_phase``      0           1*     1*      1                1
========================== =========== ====== ======= ================ ======

``value_phase`` followed by ``actor_critic_phase`` is the paper's update order (step V first,
then the actor and Q with the new V); it costs exactly one V(s) pass more than ``forward``.
(*) Both without gradient, so they share one call on s and s' stacked into one batch.
TorchRL's own loss evaluates the target critics twice and V(s) twice per batch.
"""
from __future__ import annotations

import numbers
import warnings
from copy import deepcopy
from dataclasses import dataclass

import torch
from tensordict import TensorDict, TensorDictBase, TensorDictParams
from tensordict.nn import (
    ProbabilisticTensorDictModule,
    ProbabilisticTensorDictSequential,
    TensorDictModule,
    TensorDictSequential,
    dispatch,
)
from tensordict.utils import NestedKey
from torch import Tensor, nn
from torchrl.objectives.common import LossModule
from torchrl.objectives.utils import (
    ValueEstimators,
    _vmap_func,
    dispatch_value_estimator,
)
from torchrl.objectives.value import TD0Estimator, ValueEstimatorBase

from iql_torchrl.objectives.equations import (
    MAX_AWR_WEIGHT, actor_objective, bellman_target, critic_objective, expectile_loss, value_objective,
)
from iql_torchrl.objectives.checks import (
    NETWORKS,
    batch_shaped,
    check_action_batch,
    check_action_size,
    check_input,
    named_dtype_error,
    flat_key,
    floating_dtype,
    nonfinite,
    spec_last_dim,
)
from iql_torchrl.objectives.networks import concatenated_input_width, critic_copies, own_critic_parameters
from iql_torchrl.objectives.plain_mlp import PlainMLP

__all__ = ["IQLLoss", "is_probabilistic", "TRAINED_NETWORKS"]

# the networks IQL trains, as the loss names them ("<name>_network", "<name>_network_params")
TRAINED_NETWORKS = NETWORKS

# --------------------------------------------------------------------------- the loss module
class IQLLoss(LossModule):
    r"""Implicit Q-Learning loss, paper-faithful and evaluating each network once per batch.

    Args:
        actor_network: the policy. A ``ProbabilisticActor`` (any distribution with
            ``log_prob``: TanhNormal, Normal, ...) is trained by advantage-weighted log-likelihood
            ``−w·log π(a|s)``; any other ``TensorDictModule`` (TorchRL's deterministic ``Actor``
            included) writing the action key by the advantage-weighted squared error
            ``w·‖π(s) − a‖²`` (see :func:`is_probabilistic`).
        qvalue_network: Q(s, a), writing ``state_action_value`` with a trailing dim of 1. A list of
            ``num_qvalue_nets`` modules is used as given. A single module keeps its weights as
            critic 0; critics 1…N−1 are deep copies re-initialised by their ``reset_parameters``
            (a ``ValueError`` if some parameter is reached by none: pass a list then).
        value_network: V(s), writing ``state_value`` with a trailing dim of 1.

    Keyword Args:
        num_qvalue_nets (int): number of critics; the min over their targets is used. Default 2.
        loss_function (str): critic regression loss, ``"l2"`` (paper), ``"l1"`` or ``"smooth_l1"``.
            Summed over critics. Default ``"l2"``.
        temperature (float): β, the inverse temperature of the AWR weight. 0 is behaviour cloning.
            Default 3.0 (paper, MuJoCo).
        expectile (float): τ in (0, 1). Default 0.7 (paper, MuJoCo).
        separate_losses (bool): if ``True``, parameters the value network or the critics share
            with the actor are trained by the actor loss only; V and the critics see them without
            gradient (as in TorchRL).
        reduction (str): ``"mean"`` (default), ``"sum"`` or ``"none"`` (losses keep the batch shape).
        deactivate_vmap (bool): evaluate the critic ensemble with a Python loop instead of vmap.
        scalar_output_mode (str): with ``reduction="none"``, ``"exclude"`` drops the 0-dim outputs
            (entropy, diagnostics), ``"non_tensor"`` stores them as non-tensor data.

    Differences from ``torchrl.objectives.IQLLoss`` (all intended, all the paper's):
    ``expectile`` 0.7 (TorchRL 0.5), ``temperature`` 3.0 (TorchRL 1.0), ``loss_function`` ``"l2"``
    (TorchRL ``"smooth_l1"``); Q's bootstrap target uses V(s') only through ``terminated`` (never
    ``done``); each network runs once per batch; a single critic module keeps its weights as critic
    0 (TorchRL re-draws every copy); deterministic actors, ``[B, 1]`` categorical and bool one-hot
    actions are supported; shapes and dtypes are checked with named errors before any network runs.

    The output holds ``loss_value``, ``loss_qvalue``, ``loss_actor``, ``entropy`` (for
    probabilistic actors: −mean log π(a|s) on dataset actions, as in TorchRL) and detached 0-dim
    diagnostics: ``value_mean``, ``min_q_mean``, ``advantage_mean``, ``awr_weight_mean``,
    ``awr_weight_max``, ``awr_weight_clamped_frac``, ``non_finite`` (a device-side bool: some loss
    is NaN or inf; read it when logging, it costs no sync here).

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from iql_torchrl import IQLLoss, make_iql_networks
        >>> actor, qvalue, value = make_iql_networks(obs_dim=3, action_dim=2, hidden_sizes=(32, 32))
        >>> loss = IQLLoss(actor, qvalue, value)
        >>> batch = TensorDict({
        ...     "observation": torch.randn(8, 3), "action": torch.rand(8, 2) * 2 - 1,
        ...     ("next", "observation"): torch.randn(8, 3), ("next", "reward"): torch.randn(8, 1),
        ...     ("next", "done"): torch.zeros(8, 1, dtype=torch.bool),
        ...     ("next", "terminated"): torch.zeros(8, 1, dtype=torch.bool)}, [8])
        >>> out = loss(batch)
        >>> (out["loss_value"] + out["loss_qvalue"] + out["loss_actor"]).backward()
    """

    @dataclass
    class _AcceptedKeys:
        """Tensordict keys the loss reads and writes; rename them with ``set_keys(...)``.

        Attributes:
            value (NestedKey): where V(s) is written by the value network. Default ``"state_value"``.
            action (NestedKey): the dataset action. Default ``"action"``.
            log_prob (NestedKey): where log π(a|s) is written into the input. Default ``"_log_prob"``.
            priority (NestedKey): where the per-sample TD error (max over critics) is written into
                the input, for prioritized replay. Default ``"td_error"``.
            state_action_value (NestedKey): where Q(s, a) is written by the critic.
                Default ``"state_action_value"``.
            reward (NestedKey): reward, read under ``"next"``. Default ``"reward"``.
            done (NestedKey): done flag, read under ``"next"`` by multi-step estimators.
                Default ``"done"``.
            terminated (NestedKey): termination flag, read under ``"next"``: only terminated
                transitions stop the bootstrap. Default ``"terminated"``.
        """

        value: NestedKey = "state_value"
        action: NestedKey = "action"
        log_prob: NestedKey = "_log_prob"
        priority: NestedKey = "td_error"
        state_action_value: NestedKey = "state_action_value"
        reward: NestedKey = "reward"
        done: NestedKey = "done"
        terminated: NestedKey = "terminated"

    tensor_keys: _AcceptedKeys
    default_keys = _AcceptedKeys
    default_value_estimator = ValueEstimators.TD0
    delay_qvalue = True  # TorchRL's flag: the critics have target copies (the value and actor losses read them)
    SUPPORTED_VALUE_ESTIMATORS = (ValueEstimators.TD0, ValueEstimators.TD1, ValueEstimators.TDLambda)
    out_keys = ["loss_actor", "loss_qvalue", "loss_value", "entropy"]

    actor_network: TensorDictModule
    actor_network_params: TensorDictParams
    target_actor_network_params: TensorDictParams
    qvalue_network: TensorDictModule
    qvalue_network_params: TensorDictParams
    target_qvalue_network_params: TensorDictParams
    value_network: TensorDictModule
    value_network_params: TensorDictParams
    target_value_network_params: TensorDictParams

    def __init__(
        self,
        actor_network: TensorDictModule,
        qvalue_network: TensorDictModule | list[TensorDictModule],
        value_network: TensorDictModule,
        *,
        num_qvalue_nets: int = 2,
        loss_function: str = "l2",
        temperature: float = 3.0,
        expectile: float = 0.7,
        gamma: float | None = None,
        priority_key: str | None = None,
        separate_losses: bool = False,
        reduction: str | None = None,
        deactivate_vmap: bool = False,
        scalar_output_mode: str | None = None,
    ) -> None:
        if gamma is not None:
            raise TypeError(
                "gamma is not a constructor argument: set it with loss.make_value_estimator(gamma=...)."
            )
        expectile, temperature = _expectile(expectile), _temperature(temperature)
        if loss_function not in ("l2", "l1", "smooth_l1"):
            raise ValueError(f"loss_function must be 'l2', 'l1' or 'smooth_l1', got {loss_function!r}.")
        reduction = "mean" if reduction is None else reduction
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}.")
        if value_network is None:
            raise ValueError("IQL needs a value network V(s): pass value_network.")
        self._in_keys = None
        self._out_keys = None
        super().__init__()
        self._dtypes = None  # the networks' parameter dtypes, for the input checks
        self._set_deprecated_ctor_keys(priority=priority_key)
        # β and τ are 0-d buffers the losses read as tensors: setting them between calls reaches a
        # compiled step or a captured CUDA graph without recompiling (non-persistent: not in state_dict)
        self.register_buffer("_temperature", torch.tensor(float(temperature)), persistent=False)
        self.register_buffer("_expectile", torch.tensor(float(expectile)), persistent=False)
        self.register_buffer("_expectile_complement", torch.tensor(1.0 - expectile), persistent=False)  # as TorchRL rounds it
        self._temperature_value, self._expectile_value = temperature, expectile  # as given, for reading back
        self.loss_function = loss_function
        self.reduction = reduction
        self.deactivate_vmap = deactivate_vmap
        self.num_qvalue_nets = num_qvalue_nets
        self.is_probabilistic_actor = is_probabilistic(actor_network)
        self._expected_action_size = spec_last_dim(actor_network)

        self.convert_to_functional(actor_network, "actor_network", create_target_params=False)
        shared_with_actor = list(actor_network.parameters()) if separate_losses else None
        self.convert_to_functional(
            value_network, "value_network", create_target_params=False, compare_against=shared_with_actor
        )
        if separate_losses:
            shared_with_actor = shared_with_actor + list(value_network.parameters())
        critics = critic_copies(qvalue_network, num_qvalue_nets, shared=shared_with_actor)
        self.convert_to_functional(
            critics, "qvalue_network", num_qvalue_nets, create_target_params=True, compare_against=shared_with_actor
        )
        own_critic_parameters(
            self.qvalue_network_params, critics, detached=shared_with_actor or (),
            elsewhere=[*actor_network.parameters(), *value_network.parameters()],
        )
        self._critic_in_features = concatenated_input_width(critics[0])
        self.make_value_estimator()  # built now, so state_dicts of fresh and used losses match
        self._make_vmap()
        # the calls the loss makes at given parameters, as modules for torch.func.functional_call (kept out of
        # the loss's submodules, as TorchRL keeps the networks)
        self.__dict__["_network_calls"] = {
            ("value", "forward"): _MethodCall(self.value_network, "forward"),
            ("actor", "forward"): _MethodCall(self.actor_network, "forward"),
            ("actor", "get_dist"): _MethodCall(self.actor_network, "get_dist"),
        }
        # a TorchRL IQLLoss with one critic stores it unstacked; this one holds it stacked [1, …]
        self.register_load_state_dict_pre_hook(_stack_a_single_critic)
        # plain MLPs are evaluated from their parameters (the critics as batched matmuls); None: through the module
        self.plain_value = PlainMLP.from_module(self.value_network)
        self.plain_qvalue = None if deactivate_vmap else PlainMLP.from_module(self.qvalue_network)

        if reduction == "none" and scalar_output_mode is None:
            warnings.warn(
                "With reduction='none' the 0-dim outputs (entropy and diagnostics) do not fit the "
                "batch-shaped output and are left out. Pass scalar_output_mode='exclude' to silence "
                "this, or 'non_tensor' to keep them as non-tensor data.",
                UserWarning,
                stacklevel=2,
            )
            scalar_output_mode = "exclude"
        self.scalar_output_mode = scalar_output_mode
        self._parameter_dtypes()

    # ------------------------------------------------------------------ live hyperparameters
    @property
    def expectile(self) -> float:
        """τ in (0, 1); may change between calls (``loss.expectile = 0.9``), compiled steps included."""
        return self._expectile_value

    @expectile.setter
    def expectile(self, value: float) -> None:
        value = _expectile(value)
        self._expectile.fill_(value)
        self._expectile_complement.fill_(1.0 - value)
        self._expectile_value = value

    @property
    def temperature(self) -> float:
        """β ≥ 0 (0 is behaviour cloning); may change between calls, compiled steps included."""
        return self._temperature_value

    @temperature.setter
    def temperature(self, value: float) -> None:
        value = _temperature(value)
        self._temperature.fill_(value)
        self._temperature_value = value

    def train(self, mode: bool = True):
        """Sets training mode on the loss and its networks (which TorchRL keeps outside the module's
        children): ``loss.eval()`` switches the actor's dropout off, in every mode of the update step."""
        super().train(mode)
        for name in NETWORKS:
            getattr(self, f"{name}_network").train(mode)
        return self

    # ------------------------------------------------------------------ TorchRL plumbing
    def _make_vmap(self):
        """The critic ensemble's vmapped call, made again by ``set_vmap_randomness`` (a critic that draws
        random numbers through a functional call needs ``"different"`` or ``"same"``)."""
        self._vmapped_qvalue = _vmap_func(
            self.qvalue_network, (None, 0), randomness=self.vmap_randomness, pseudo_vmap=self.deactivate_vmap
        )

    def get_stateful_net(self, network_name: str, copy: bool | None = None):
        """As TorchRL's: the network holding the loss's parameters (a deep copy by default). One critic
        (``num_qvalue_nets=1``) is returned unstacked, as TorchRL holds it."""
        params = getattr(self, f"{network_name}_params", None)
        if network_name != "qvalue_network" or params is None or params.batch_size != (1,):
            return super().get_stateful_net(network_name, copy)
        net = getattr(self, network_name)
        if copy is None or copy:
            net = deepcopy(net)
        params[0].to_module(net, preserve_module_state=False)
        return net

    def _set_in_keys(self):
        keys = [
            self.tensor_keys.action,
            ("next", self.tensor_keys.reward),
            ("next", self.tensor_keys.done),
            ("next", self.tensor_keys.terminated),
            *self.actor_network.in_keys,
            *self.qvalue_network.in_keys,
            *self.value_network.in_keys,
            *[("next", key) for key in self.value_network.in_keys],
        ]
        self._in_keys = list(dict.fromkeys(flat_key(k) if isinstance(k, tuple) else k for k in keys))

    @property
    def in_keys(self):
        if self._in_keys is None:
            self._set_in_keys()
        return self._in_keys

    @in_keys.setter
    def in_keys(self, values):
        self._in_keys = values

    def _forward_value_estimator_keys(self, **kwargs) -> None:
        if self._value_estimator is not None:
            self._value_estimator.set_keys(**self._estimator_keys())
        self._set_in_keys()

    def _estimator_keys(self) -> dict:
        # TorchRL's estimators refuse a value key their network does not write; the loss lets the
        # user fix it with set_keys after construction (and names it at the first call if not)
        keys = {"reward": self.tensor_keys.reward, "done": self.tensor_keys.done,
                "terminated": self.tensor_keys.terminated}
        if self.tensor_keys.value in self.value_network.out_keys:
            keys["value"] = self.tensor_keys.value
        return keys

    def make_value_estimator(self, value_type: ValueEstimators = None, **hyperparams):
        """Chooses the bootstrap target for Q: TD0 (the paper, default), TD1 or TDLambda; gamma here."""
        if value_type is None:
            value_type = self.default_value_estimator
        if isinstance(value_type, ValueEstimatorBase) or (
            isinstance(value_type, type) and issubclass(value_type, ValueEstimatorBase)
        ):
            return LossModule.make_value_estimator(self, value_type, **hyperparams)
        dispatch_value_estimator(
            self,
            value_type,
            supported=self.SUPPORTED_VALUE_ESTIMATORS,
            tensor_keys={"value_target": "value_target", **self._estimator_keys()},
            **hyperparams,
        )

    def claim_target_update(self) -> None:
        """The caller updates the target critics (as TorchRL's ``SoftUpdate`` does, or :class:`IQLUpdate`):
        TorchRL's warning about target parameters without an updater is not raised."""
        for network in self._has_update_associated:
            self._has_update_associated[network] = True

    # ------------------------------------------------------------------ network calls
    def _params(self, params: dict | None, network: str) -> TensorDictBase | dict:
        """The parameters to evaluate ``network`` with: ``params[network]`` when given, else the loss's own.

        ``network`` is ``"actor"``, ``"value"``, ``"qvalue"`` or ``"target_qvalue"``. Passing
        ``params`` evaluates the loss as a pure function of them (the fused update step
        differentiates it with ``torch.func``).
        """
        if params is not None and network in params:
            return params[network]
        return getattr(self, f"{network}_network_params")

    def _params_td(self, params: dict | None, network: str) -> TensorDictBase:
        """:meth:`_params` as a TensorDict, what the critics' ``vmap`` takes."""
        given = self._params(params, network)
        if isinstance(given, TensorDictBase):
            return given
        return _nested_tensordict(given, getattr(self, f"{network}_network_params").batch_size)

    def _call_network(self, params: dict | None, network: str, method: str, tensordict: TensorDictBase):
        """``<network>_network.<method>(tensordict)`` at the parameters :meth:`_params` gives: a TensorDict of them
        is swapped in with ``to_module``, a dict (the fused step's) through ``torch.func.functional_call``, which a
        compiled step traces in a fraction of the steps."""
        given = self._params(params, network)
        if isinstance(given, TensorDictBase):
            module = getattr(self, f"{network}_network")
            # preserve_module_state=False keeps detached (shared, separate_losses) tensors detached
            with given.to_module(module, preserve_module_state=False):
                return getattr(module, method)(tensordict)
        named = {".".join(("network", *_key_tuple(key))): value for key, value in given.items()}
        return torch.func.functional_call(self._network_calls[network, method], named, (tensordict,), tie_weights=False)

    @staticmethod
    def _plain(plain: PlainMLP | None, out_key) -> bool:
        """Whether to evaluate a network as a plain MLP: recognised, writing the key the loss reads, no hooks."""
        return plain is not None and out_key in plain.out_keys and not plain.hooked()

    def _state_value(self, tensordict: TensorDictBase, params: dict | None = None) -> Tensor:
        """V on the value network's in_keys of ``tensordict``; returns shape [*B] (trailing 1 dropped)."""
        if self._plain(self.plain_value, self.tensor_keys.value):
            value = self.plain_value(self._params(params, "value"), tensordict)
        else:
            td = tensordict.select(*self.value_network.in_keys)
            value = self._call_network(params, "value", "forward", td).get(self.tensor_keys.value)
        if value.shape[-1:] != (1,):
            raise ValueError(
                f"The value network must write {self.tensor_keys.value!r} with a trailing dim of 1 "
                f"([*batch, 1]); got shape {tuple(value.shape)}."
            )
        return value.squeeze(-1)

    def _critic_values(self, tensordict: TensorDictBase, params: dict | None, network: str) -> Tensor:
        """All critics (``network``: ``"qvalue"`` or ``"target_qvalue"``) on (s, a) in one call; returns Q(s, a)
        of shape [num_qvalue_nets, *B]."""
        if self._plain(self.plain_qvalue, self.tensor_keys.state_action_value):
            q_all = self.plain_qvalue(self._params(params, network), tensordict)
        else:
            td = tensordict.select(*self.qvalue_network.in_keys)
            q_all = self._vmapped_qvalue(td, self._params_td(params, network)).get(self.tensor_keys.state_action_value)
        return self._q_of_dataset_action(q_all, tensordict.get(self.tensor_keys.action))

    def _q_of_dataset_action(self, q_all: Tensor, action: Tensor) -> Tensor:
        """Continuous critics already score the dataset action: drop the trailing 1."""
        if q_all.shape[-1:] != (1,):
            raise ValueError(
                f"The Q network must write {self.tensor_keys.state_action_value!r} with a trailing dim "
                f"of 1 ([*batch, 1]); got shape {tuple(q_all.shape[1:])}. For a Q network with one "
                "output per discrete action use DiscreteIQLLoss."
            )
        return q_all.squeeze(-1)

    def _actor_objective(self, tensordict: TensorDictBase, params: dict | None = None) -> tuple[Tensor, Tensor | None]:
        """Per-sample quantity the AWR weight multiplies: −log π(a|s), or ‖π(s) − a‖² if deterministic.

        Returns it together with log π(a|s) (``None`` for a deterministic actor).
        """
        action = tensordict.get(self.tensor_keys.action)
        td = tensordict.select(*self.actor_network.in_keys)
        if not self.is_probabilistic_actor:
            predicted = self._call_network(params, "actor", "forward", td).get(self.tensor_keys.action)
            return (predicted - action).pow(2).sum(-1), None
        log_prob = self._log_prob(self._call_network(params, "actor", "get_dist", td), action)
        return -log_prob, log_prob

    def _log_prob(self, dist, action: Tensor) -> Tensor:
        log_prob = dist.log_prob(action)
        if log_prob.shape == action.shape:  # a factorised distribution without Independent
            log_prob = log_prob.sum(-1)
        return log_prob

    # ------------------------------------------------------------------ the three losses
    @staticmethod
    def loss_value_diff(diff: Tensor, expectile: float = 0.8) -> Tensor:
        """TorchRL's name (and default τ) for eq. (5)'s asymmetric squared loss of ``diff = Q − V``:
        :func:`~iql_torchrl.objectives.equations.expectile_loss`."""
        return expectile_loss(diff, expectile)

    def value_loss(self, tensordict: TensorDictBase, *, params: dict | None = None) -> tuple[Tensor, dict]:
        """Eq. (5): expectile regression of V(s) onto min over TARGET critics of Q(s, a_dataset).

        Evaluates the target critics once and V(s) once. Returns (loss, metadata) with the
        detached ``target_min_q`` and ``value`` for reuse by :meth:`actor_loss`.
        """
        return named_dtype_error(self._check_keys(tensordict), self._value_loss, tensordict, params)

    def _value_loss(self, tensordict: TensorDictBase, params: dict | None) -> tuple[Tensor, dict]:
        value = self._state_value(tensordict, params)
        self._check_batch_shape(tensordict, value.shape)
        min_q = self._target_min_q(tensordict, params)
        loss = value_objective(min_q, value, self._expectile, self._expectile_complement)
        return self._reduce(loss, tensordict), {"target_min_q": min_q, "value": value.detach()}

    def _target_min_q(self, tensordict: TensorDictBase, params: dict | None) -> Tensor:
        """min_i Q̄_i(s, a_dataset) over the TARGET critics, without gradient: shape [*B]."""
        with torch.no_grad():
            return self._critic_values(tensordict, params, "target_qvalue").min(0).values

    def actor_loss(
        self,
        tensordict: TensorDictBase,
        target_min_q: Tensor | None = None,
        value: Tensor | None = None,
        *,
        params: dict | None = None,
    ) -> tuple[Tensor, dict]:
        """Eq. (7): −exp(β·(min Q_target − V(s))).clamp(max=100)·log π(a|s), the weight detached.

        ``target_min_q`` and ``value`` are computed here when not given (so the method also
        works alone, as TorchRL's does). Evaluates the actor once.
        """
        return named_dtype_error(self._check_keys(tensordict), self._actor_loss, tensordict, target_min_q, value, params)

    def _actor_loss(self, tensordict, target_min_q, value, params) -> tuple[Tensor, dict]:
        if target_min_q is None:
            target_min_q = self._target_min_q(tensordict, params)
        if value is None:
            with torch.no_grad():
                value = self._state_value(tensordict, params)
        objective, log_prob = self._actor_objective(tensordict, params)
        if objective.shape != target_min_q.shape:
            raise ValueError(
                f"The actor's per-sample objective has shape {tuple(objective.shape)} but the batch "
                f"is {tuple(target_min_q.shape)}: check the shape of {self.tensor_keys.action!r} and the "
                "actor's distribution (its log_prob must reduce over the action dim)."
            )
        loss, weight, advantage = actor_objective(target_min_q, value, objective, self._temperature)
        kept = self._kept(tensordict, weight)
        metadata = {
            "advantage_mean": _mean(advantage, kept),
            "awr_weight_mean": _mean(weight, kept),
            "awr_weight_max": (weight if kept is None else torch.where(kept, weight, 0.0)).max(),  # weights are > 0
            "awr_weight_clamped_frac": _mean((weight >= MAX_AWR_WEIGHT).float(), kept),
        }
        if log_prob is not None:
            log_prob = log_prob.detach()
            tensordict.set(self.tensor_keys.log_prob, log_prob)
            metadata["entropy"] = -_mean(log_prob, kept)
        return self._reduce(loss, tensordict), metadata

    def qvalue_loss(
        self, tensordict: TensorDictBase, next_value: Tensor | None = None, *, params: dict | None = None
    ) -> tuple[Tensor, dict]:
        """Eq. (6): every online critic regresses onto r + γ·(1 − terminated)·V(s'); summed over critics.

        Evaluates V(s') once (unless ``next_value`` is given) and the online critics once (one
        call for the ensemble).
        """
        return named_dtype_error(self._check_keys(tensordict), self._qvalue_loss, tensordict, next_value, params)

    def _qvalue_loss(self, tensordict, next_value, params) -> tuple[Tensor, dict]:
        with torch.no_grad():
            target = self._bellman_target(tensordict, next_value, params)
        q = self._critic_values(tensordict, params, "qvalue")
        if q.shape[1:] != target.shape:
            raise ValueError(
                f"Q(s, a) has batch shape {tuple(q.shape[1:])} but the Bellman target has "
                f"{tuple(target.shape)}: check the shapes of {self.tensor_keys.action!r} and "
                f"('next', {self.tensor_keys.reward!r})."
            )
        loss = critic_objective(q, target, self.loss_function)
        td_error = (q.detach() - target).pow(2)
        q_mean = _mean(q.detach().mean(0), self._kept(tensordict, target))
        return self._reduce(loss, tensordict), {"td_error": td_error, "q_mean": q_mean}

    def _bellman_target(self, tensordict: TensorDictBase, next_value: Tensor | None = None, params=None) -> Tensor:
        next_td = tensordict.get("next")
        if next_value is None:
            next_value = self._state_value(next_td, params)
        estimator = self.value_estimator
        if type(estimator) is not TD0Estimator or estimator.average_rewards:
            # multi-step estimators (TD1, TDLambda), TD0 standardising rewards, a user's own estimator:
            # TorchRL's code, which reads the batch's steps_to_next_obs itself
            return estimator.value_estimate(tensordict, next_value=next_value.unsqueeze(-1)).squeeze(-1)
        reward = batch_shaped(next_td, self.tensor_keys.reward, next_value.shape)
        terminated = batch_shaped(next_td, self.tensor_keys.terminated, next_value.shape)
        gamma = estimator.gamma
        steps_key = estimator.tensor_keys.steps_to_next_obs
        if tensordict.get(steps_key, None) is not None:  # n-step batches: γ^n
            gamma = gamma ** batch_shaped(tensordict, steps_key, next_value.shape, prefix=None)
        return bellman_target(reward, terminated.bool(), next_value, gamma)

    # ------------------------------------------------------------------ forward and phases
    @dispatch
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        """All three losses with each network evaluated once (V is stepped with the others)."""
        return self.evaluate(tensordict)

    def evaluate(self, tensordict: TensorDictBase, params: dict | None = None) -> TensorDictBase:
        """:meth:`forward` evaluated at ``params`` instead of the loss's own parameters.

        ``params`` maps any of ``"actor"``, ``"value"``, ``"qvalue"``, ``"target_qvalue"`` to a
        TensorDict shaped like the loss's ``*_network_params``, or to a dict from its leaf keys (as
        ``items(True, True)`` names them) to tensors; missing entries (or ``None``) use the loss's own.
        :meth:`value_phase` and :meth:`actor_critic_phase` take it too. The fused update step
        differentiates the loss this way with ``torch.func`` (one compiled graph).
        """
        # checked once; the three losses are the unchecked bodies
        return named_dtype_error(self._check_keys(tensordict), self._evaluate, tensordict, params)

    def _evaluate(self, tensordict: TensorDictBase, params: dict | None) -> TensorDictBase:
        loss_value, value_md = self._value_loss(tensordict, params)
        loss_actor, actor_md = self._actor_loss(tensordict, value_md["target_min_q"], value_md["value"], params)
        loss_qvalue, q_md = self._qvalue_loss(tensordict, None, params)
        return self._output(tensordict, value_md, actor_md, q_md, loss_value, loss_actor, loss_qvalue)

    def value_phase(self, tensordict: TensorDictBase, params: dict | None = None) -> tuple[TensorDictBase, Tensor]:
        """First half of the paper's update order: ``loss_value`` only.

        Returns the output TensorDict and the detached min over target critics, to pass to
        :meth:`actor_critic_phase` after V has been stepped. Calls: target critics 1, V(s) 1.
        """
        loss_value, value_md = self.value_loss(tensordict, params=params)
        return self._output(tensordict, value_md, None, None, loss_value), value_md["target_min_q"]

    def actor_critic_phase(
        self, tensordict: TensorDictBase, target_min_q: Tensor, params: dict | None = None
    ) -> TensorDictBase:
        """Second half of the paper's update order: ``loss_actor`` and ``loss_qvalue`` with the new V.

        Calls: V 1 (no grad, on s and s' stacked into one batch), online critics 1, actor 1;
        target critics 0.
        """
        return named_dtype_error(self._check_keys(tensordict), self._actor_critic_phase, tensordict, target_min_q, params)

    def _actor_critic_phase(self, tensordict: TensorDictBase, target_min_q: Tensor, params: dict | None) -> TensorDictBase:
        with torch.no_grad():
            in_keys = self.value_network.in_keys
            both = torch.cat([tensordict.select(*in_keys), tensordict.get("next").select(*in_keys)])
            value, next_value = self._state_value(both, params).chunk(2)
        loss_actor, actor_md = self._actor_loss(tensordict, target_min_q, value, params)
        loss_qvalue, q_md = self._qvalue_loss(tensordict, next_value, params)
        value_md = {"value": value, "target_min_q": target_min_q}
        return self._output(tensordict, value_md, actor_md, q_md, None, loss_actor, loss_qvalue)

    def _output(self, tensordict, value_md, actor_md, q_md, loss_value=None, loss_actor=None, loss_qvalue=None):
        losses = {
            name: loss
            for name, loss in (("loss_actor", loss_actor), ("loss_qvalue", loss_qvalue), ("loss_value", loss_value))
            if loss is not None
        }
        kept = self._kept(tensordict, value_md["value"])
        scalars = {"value_mean": _mean(value_md["value"], kept), "min_q_mean": _mean(value_md["target_min_q"], kept)}
        if actor_md is not None:
            scalars.update(actor_md)
        if q_md is not None:
            tensordict.set(self.tensor_keys.priority, q_md["td_error"].max(0).values)
            scalars["q_mean"] = q_md["q_mean"]
        scalars["non_finite"] = nonfinite(losses.values()).any()
        if self.reduction != "none":
            return TensorDict({**losses, **scalars}, batch_size=[])
        out = TensorDict(losses, batch_size=tensordict.batch_size)
        if self.scalar_output_mode == "non_tensor":
            for name, scalar in scalars.items():
                out.set_non_tensor(name, scalar)
        return out

    def _reduce(self, loss: Tensor, tensordict: TensorDictBase) -> Tensor:
        """``reduction`` over the positions the batch's validity masks keep: TorchRL's ``_reduce_loss``,
        which reads ``loss_mask_key`` (``"auto"``: ``("collector", "mask")`` of a padding
        ``SliceSampler``, ``"shifted_valid"``); a mean divides by the kept positions, ``"none"`` zeroes
        the others. All three losses are masked (TorchRL's Q loss drops the masks with its ``select``)."""
        return self._reduce_loss(loss, tensordict=tensordict)

    def _kept(self, tensordict: TensorDictBase, like: Tensor) -> Tensor | None:
        """The positions the batch's validity masks keep (those :meth:`_reduce` reads), shaped like ``like``;
        None when the batch has none. The diagnostics (value_mean, entropy, ...) average over them too."""
        kept = None
        for key in self._loss_mask_keys():
            mask = tensordict.get(key, None)
            if mask is not None:
                mask = self._expand_loss_mask(mask, like)
                kept = mask if kept is None else kept & mask
        return kept

    # ------------------------------------------------------------------ input checks (iql_torchrl.objectives.checks)
    def _check_keys(self, tensordict: TensorDictBase) -> str | None:
        """Keys, dtypes and the action, checked before any network runs; returns a dtype difference that
        only a network called as a module sees (it may cast), to name if that call fails."""
        keys = self.tensor_keys
        direct = frozenset(name for name, plain, key in (("value", self.plain_value, keys.value),
                                                         ("qvalue", self.plain_qvalue, keys.state_action_value))
                           if self._plain(plain, key))
        doubt = check_input(self, tensordict, self._parameter_dtypes(), direct)
        self._check_action(tensordict)
        return doubt

    def _parameter_dtypes(self) -> dict:
        """Each network's floating dtype, read once and again after ``.to()``/``.double()`` (``_apply``)."""
        if self._dtypes is None:
            self._dtypes = {name: floating_dtype(getattr(self, f"{name}_network_params")) for name in NETWORKS}
        return self._dtypes

    def _apply(self, *args, **kwargs):
        self._dtypes = None
        self.conversions = getattr(self, "conversions", 0) + 1  # IQLUpdate checks the layout again after one
        out = super()._apply(*args, **kwargs)
        if "_expectile" in self._buffers:  # built: read now, not inside a traced step (a side effect there)
            self._parameter_dtypes()
        return out

    def _check_action(self, tensordict: TensorDictBase) -> None:
        check_action_size(tensordict, self.tensor_keys.action, self._expected_action_size,
                          self._critic_in_features, self.qvalue_network.in_keys)

    def _check_batch_shape(self, tensordict: TensorDictBase, batch_shape: torch.Size) -> None:
        """Action, reward and terminated must share V(s)'s batch shape (no silent broadcasting)."""
        next_td = tensordict.get("next")
        batch_shaped(next_td, self.tensor_keys.reward, batch_shape, prefix="next")
        batch_shaped(next_td, self.tensor_keys.terminated, batch_shape, prefix="next")
        self._check_action_shape(tensordict.get(self.tensor_keys.action), batch_shape)

    def _check_action_shape(self, action: Tensor, batch_shape: torch.Size) -> None:
        check_action_batch(action, self.tensor_keys.action, batch_shape)


# --------------------------------------------------------------------------- helpers
def _nested_tensordict(flat: dict, batch_size: torch.Size) -> TensorDict:
    """A TensorDict of ``flat``'s tensors, keyed by its (nested) keys; built from nested dicts, which a compiled
    graph traces in fewer steps than nested keys set one by one."""
    nested = {}
    for key, value in flat.items():
        *parents, name = _key_tuple(key)
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[name] = value
    return TensorDict(nested, batch_size=batch_size)


def _key_tuple(key: NestedKey) -> tuple[str, ...]:
    return (key,) if isinstance(key, str) else key


class _MethodCall(nn.Module):
    """``network.<method>(*args)`` as a module's forward, for ``torch.func.functional_call`` (parameters named
    ``network.<name>``)."""

    def __init__(self, network: nn.Module, method: str):
        super().__init__()
        self.network, self.method = network, method

    def forward(self, *args):
        return getattr(self.network, self.method)(*args)


def _mean(x: Tensor, kept: Tensor | None) -> Tensor:
    """The mean of ``x`` over the positions ``kept`` keeps (every position when None)."""
    if kept is None:
        return x.mean()
    return torch.where(kept, x, 0.0).sum() / kept.sum().clamp_min(1)


def _real(value) -> float | None:
    """A Python, NumPy or 0-d tensor real number as a float; None for anything else (bools included)."""
    if isinstance(value, Tensor):
        if value.ndim or value.dtype == torch.bool or value.is_complex():
            return None
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def _expectile(value) -> float:
    number = _real(value)
    if number is None or not 0.0 < number < 1.0:
        raise ValueError(f"expectile must be a number in (0, 1), got {value!r}.")
    return number


def _temperature(value) -> float:
    number = _real(value)
    if number is None or not number >= 0:
        raise ValueError(f"temperature must be a number >= 0 (0 is behaviour cloning), got {value!r}.")
    return number


def _stack_a_single_critic(loss: IQLLoss, state_dict: dict, prefix: str, *args) -> None:
    """Loads a state_dict holding one critic unstacked (TorchRL's IQLLoss with ``num_qvalue_nets=1``)
    into this loss's stacked ``[1, …]`` critic parameters."""
    for name in ("qvalue_network_params", "target_qvalue_network_params"):
        params = getattr(loss, name, None)
        if params is None or params.batch_size != (1,):
            continue
        for key, held in params.items(include_nested=True, leaves_only=True):
            entry = ".".join((prefix + name, *(key if isinstance(key, tuple) else (key,))))
            given = state_dict.get(entry)
            if isinstance(given, Tensor) and given.shape == held.shape[1:]:
                state_dict[entry] = given.unsqueeze(0)


def is_probabilistic(actor: nn.Module) -> bool:
    """Whether the actor is trained by log-likelihood (a distribution) or by squared error.

    Decided by what the module is: TensorDict's probabilistic modules (``ProbabilisticActor``)
    are; any other ``TensorDictModule`` is not, TorchRL's deterministic ``Actor`` included (its
    ``get_dist`` returns a Delta, whose log-density is infinite). Other modules: by ``get_dist``.
    """
    if isinstance(actor, (ProbabilisticTensorDictSequential, ProbabilisticTensorDictModule)):
        return True
    if isinstance(actor, TensorDictSequential) and any(
        isinstance(module, ProbabilisticTensorDictModule) for module in actor.modules()
    ):
        raise TypeError(
            "The actor is a TensorDictSequential holding a ProbabilisticTensorDictModule, which gives the loss "
            "no distribution (get_dist): build it as ProbabilisticTensorDictSequential(...) or TorchRL's "
            "ProbabilisticActor so it is trained by -log π(a|s)."
        )
    if isinstance(actor, TensorDictModule):
        return False
    return hasattr(actor, "get_dist")


