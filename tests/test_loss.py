"""IQLLoss against the paper's equations, with numbers worked out by hand.

The hand-checked network is tiny and linear:  obs s, action a (both 1-d), two critics
Q1(s, a) = s + 2a, Q2(s, a) = s + 0.5, V(s) = s, deterministic actor π(s) = 0.25·s.
Batch: s = [1, 2], a = [0.5, −0.5], r = [1, 2], s' = [2, 1], terminated = [F, T].

  min target Q  = min([2, 1], [1.5, 2.5])         = [1.5, 1]
  Q − V         = [1.5 − 1, 1 − 2]                = [0.5, −1]
  loss_value    = mean(0.7·0.25, 0.3·1)           = 0.2375            (τ = 0.7)
  target        = [1 + 0.99·V(2), 2 + 0]           = [2.98, 2]        (γ = 0.99; 2nd terminated)
  loss_qvalue   = mean((2−2.98)² + (1.5−2.98)², (1−2)² + (2.5−2)²)
                = mean(0.9604 + 2.1904, 1 + 0.25)  = 2.2004
  weights       = exp(3·[0.5, −1])                 = [e^1.5, e^−3]    (β = 3)
  loss_actor    = mean(e^1.5·(0.25 − 0.5)², e^−3·(0.5 + 0.5)²)
"""
import math
import warnings

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.modules import MLP
from torchrl.objectives import HardUpdate, SoftUpdate, ValueEstimators
from torchrl.objectives import IQLLoss as TorchRLIQLLoss

from iql_torchrl import DiscreteIQLLoss, IQLLoss, awr_weight, bellman_target, expectile_loss, make_iql_networks
from iql_torchrl.objectives.loss import _nested_tensordict
from iql_torchrl.objectives.networks import GaussianPolicyHead, make_actor, make_qvalue_networks
from reference import gaussian_log_prob, lambda_returns, read

warnings.filterwarnings("ignore", message="No target network updater")


# ---------------------------------------------------------------------------- fixtures
def linear(weights, bias=0.0):
    layer = nn.Linear(len(weights), 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([weights]))
        layer.bias.fill_(bias)
    return layer


class Concat(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, *xs):
        return self.net(torch.cat(xs, -1))


def hand_networks(actor=None):
    q1 = TensorDictModule(Concat(linear([1.0, 2.0])), ["observation", "action"], ["state_action_value"])
    q2 = TensorDictModule(Concat(linear([1.0, 0.0], 0.5)), ["observation", "action"], ["state_action_value"])
    value = TensorDictModule(linear([1.0]), ["observation"], ["state_value"])
    if actor is None:
        actor = TensorDictModule(linear([0.25]), ["observation"], ["action"])
    return actor, [q1, q2], value


def hand_batch(terminated=(False, True), truncated=(False, False)):
    terminated = torch.tensor(terminated).unsqueeze(-1)
    truncated = torch.tensor(truncated).unsqueeze(-1)
    return TensorDict(
        {
            "observation": torch.tensor([[1.0], [2.0]]),
            "action": torch.tensor([[0.5], [-0.5]]),
            ("next", "observation"): torch.tensor([[2.0], [1.0]]),
            ("next", "reward"): torch.tensor([[1.0], [2.0]]),
            ("next", "terminated"): terminated,
            ("next", "truncated"): truncated,
            ("next", "done"): terminated | truncated,
        },
        batch_size=[2],
    )


def random_batch(batch=16, obs_dim=3, action_dim=2, action=None):
    return TensorDict(
        {
            "observation": torch.randn(batch, obs_dim),
            "action": torch.rand(batch, action_dim) * 2 - 1 if action is None else action,
            ("next", "observation"): torch.randn(batch, obs_dim),
            ("next", "reward"): torch.randn(batch, 1),
            ("next", "terminated"): torch.rand(batch, 1) < 0.2,
            ("next", "done"): torch.rand(batch, 1) < 0.3,
        },
        batch_size=[batch],
    )


def small_loss(actor_kind="gaussian", **kwargs):
    torch.manual_seed(0)
    discrete = actor_kind in ("categorical", "one_hot")
    actor, critics, value = make_iql_networks(3, 4 if discrete else 2, actor_kind=actor_kind, hidden_sizes=(16, 16))
    if discrete:
        return DiscreteIQLLoss(actor, critics, value, action_space=actor_kind, **kwargs)
    return IQLLoss(actor, critics, value, **kwargs)


# ---------------------------------------------------------------------------- the equations
def test_expectile_loss_weights_positive_errors_by_tau_and_negative_by_one_minus_tau():
    diff = torch.tensor([2.0, -2.0, 0.0])
    assert torch.allclose(expectile_loss(diff, 0.7), torch.tensor([0.7 * 4, 0.3 * 4, 0.0]))
    assert torch.allclose(expectile_loss(diff, 0.5), torch.tensor([2.0, 2.0, 0.0]))


def test_loss_value_diff_is_torchrl_s_expectile_loss_with_its_default_tau():
    diff = torch.tensor([2.0, -2.0, 0.5, -0.5, 0.0], dtype=torch.float64)
    by_hand = {0.8: torch.tensor([0.8 * 4, 0.2 * 4, 0.8 * 0.25, 0.2 * 0.25, 0.0], dtype=torch.float64),
               0.7: torch.tensor([0.7 * 4, 0.3 * 4, 0.7 * 0.25, 0.3 * 0.25, 0.0], dtype=torch.float64)}
    assert torch.allclose(IQLLoss.loss_value_diff(diff), by_hand[0.8])  # TorchRL's default τ 0.8, not the paper's 0.7
    assert torch.allclose(IQLLoss.loss_value_diff(diff, 0.7), by_hand[0.7])
    assert not torch.allclose(IQLLoss.loss_value_diff(-diff, 0.7), by_hand[0.7])  # the weights the other way round
    for tau in (0.8, 0.7, 0.9):
        assert torch.equal(IQLLoss.loss_value_diff(diff, tau), TorchRLIQLLoss.loss_value_diff(diff, tau))


def _public_names(obj) -> set[str]:
    names = set()
    for name in dir(obj):
        try:
            getattr(obj, name)
        except RuntimeError:  # TorchRL's `device` only raises: deprecated since 0.3
            continue
        names.add(name)
    return {name for name in names if not name.startswith("_")}


def test_every_public_name_of_torchrl_s_iql_losses_is_on_ours():
    from torchrl.objectives import DiscreteIQLLoss as TorchRLDiscreteIQLLoss

    actor, critics, value = make_iql_networks(3, 2)
    discrete = make_iql_networks(3, 4, actor_kind="categorical")
    pairs = [(TorchRLIQLLoss(actor, critics, value), IQLLoss(actor, critics, value)),
             (TorchRLDiscreteIQLLoss(*discrete, action_space="categorical"),
              DiscreteIQLLoss(*discrete, action_space="categorical"))]
    for theirs, ours in pairs:  # instances: the attributes their constructors set too
        assert _public_names(theirs) - _public_names(ours) == set(), type(ours).__name__


def test_bellman_target_stops_only_at_termination():
    target = bellman_target(torch.tensor([1.0, 1.0]), torch.tensor([False, True]), torch.tensor([10.0, 10.0]), 0.9)
    assert torch.allclose(target, torch.tensor([1.0 + 9.0, 1.0]))


def test_awr_weight_is_clamped_at_100():
    weight = awr_weight(torch.tensor([0.0, 1.0, 2.0]), temperature=3.0)
    assert torch.allclose(weight, torch.tensor([1.0, math.exp(3.0), 100.0]))


# ---------------------------------------------------------------------------- hand-computed loss
def test_losses_match_the_hand_computed_values():
    loss = IQLLoss(*hand_networks())
    out = loss(hand_batch())
    assert out["loss_value"].item() == pytest.approx(0.2375, rel=1e-6)
    assert out["loss_qvalue"].item() == pytest.approx(2.2004, rel=1e-6)
    expected_actor = (math.exp(1.5) * 0.0625 + math.exp(-3.0) * 1.0) / 2
    assert out["loss_actor"].item() == pytest.approx(expected_actor, rel=1e-6)
    # diagnostics: V = [1, 2], min Q = [1.5, 1], advantage = [0.5, -1]
    assert out["value_mean"].item() == pytest.approx(1.5)
    assert out["min_q_mean"].item() == pytest.approx(1.25)
    assert out["advantage_mean"].item() == pytest.approx(-0.25)
    assert out["awr_weight_max"].item() == pytest.approx(math.exp(1.5), rel=1e-6)
    assert out["awr_weight_clamped_frac"].item() == 0.0
    assert not out["non_finite"]


def test_value_and_actor_use_the_min_over_target_critics_not_the_online_ones():
    loss = IQLLoss(*hand_networks())
    with torch.no_grad():  # move the online critics; the targets stay where they were
        loss.qvalue_network_params.apply_(lambda p: p.add_(10.0))
    out = loss(hand_batch())
    assert out["loss_value"].item() == pytest.approx(0.2375, rel=1e-6)
    assert out["min_q_mean"].item() == pytest.approx(1.25)
    expected_actor = (math.exp(1.5) * 0.0625 + math.exp(-3.0) * 1.0) / 2
    assert out["loss_actor"].item() == pytest.approx(expected_actor, rel=1e-6)
    # the online critics (every output +10 + 10·(s + a) terms) would give weights clamped at 100
    assert out["awr_weight_max"].item() < 100.0


def test_moving_the_target_critics_moves_the_value_and_actor_losses_but_not_the_critic_loss():
    loss = IQLLoss(*hand_networks())
    with torch.no_grad():  # target biases +1: min target Q = [2.5, 2], advantages [1.5, 0]
        for key, p in loss.target_qvalue_network_params.items(True, True):
            if key[-1] == "bias":
                p.add_(1.0)
    out = loss(hand_batch())
    assert out["loss_value"].item() == pytest.approx((0.7 * 1.5**2 + 0.0) / 2, rel=1e-6)
    assert out["loss_actor"].item() == pytest.approx((math.exp(4.5) * 0.0625 + 1.0 * 1.0) / 2, rel=1e-6)
    assert out["loss_qvalue"].item() == pytest.approx(2.2004, rel=1e-6)


def test_critic_loss_is_summed_over_critics_with_mse():
    loss = IQLLoss(*hand_networks(), num_qvalue_nets=2)
    per_sample = IQLLoss(*hand_networks(), reduction="none", scalar_output_mode="exclude")(hand_batch())
    assert torch.allclose(per_sample["loss_qvalue"], torch.tensor([0.9604 + 2.1904, 1.0 + 0.25]))
    assert loss(hand_batch())["loss_qvalue"].item() == pytest.approx((3.1508 + 1.25) / 2, rel=1e-6)


def test_truncated_transitions_still_bootstrap():
    # the second transition is truncated (done) but not terminated: its target is 2 + 0.99 * V(1)
    loss = IQLLoss(*hand_networks(), reduction="none", scalar_output_mode="exclude")
    out = loss(hand_batch(terminated=(False, False), truncated=(False, True)))
    target = torch.tensor([2.98, 2.0 + 0.99 * 1.0])
    q1, q2 = torch.tensor([2.0, 1.0]), torch.tensor([1.5, 2.5])
    assert torch.allclose(out["loss_qvalue"], (q1 - target) ** 2 + (q2 - target) ** 2)


def test_advantages_above_the_clamp_get_weight_100():
    # V = s - 2 gives advantages [2.5, 1]: exp(3 * 2.5) > 100 is clamped, exp(3) is not
    actor, critics, _ = hand_networks()
    value = TensorDictModule(linear([1.0], -2.0), ["observation"], ["state_value"])
    out = IQLLoss(actor, critics, value)(hand_batch())
    assert out["awr_weight_max"].item() == 100.0
    assert out["awr_weight_clamped_frac"].item() == 0.5
    expected = (100.0 * 0.0625 + math.exp(3.0) * 1.0) / 2
    assert out["loss_actor"].item() == pytest.approx(expected, rel=1e-6)


def test_gaussian_actor_is_trained_by_weighted_log_likelihood():
    # loc = tanh(0) = 0 and log_std = 0: log N(±0.5; 0, 1) = -0.125 - 0.5 log(2π)
    actor = make_actor(1, 1, hidden_sizes=(4,))
    head = actor.module[0].module
    assert isinstance(head, GaussianPolicyHead)
    with torch.no_grad():
        for p in head.net.parameters():
            p.zero_()
    out = IQLLoss(*hand_networks(actor))(hand_batch())
    nll = 0.125 + 0.5 * math.log(2 * math.pi)
    expected = (math.exp(1.5) * nll + math.exp(-3.0) * nll) / 2
    assert out["loss_actor"].item() == pytest.approx(expected, rel=1e-5)
    assert out["entropy"].item() == pytest.approx(nll, rel=1e-5)


def test_temperature_zero_is_behaviour_cloning():
    out = IQLLoss(*hand_networks(), temperature=0.0)(hand_batch())
    assert out["loss_actor"].item() == pytest.approx((0.0625 + 1.0) / 2)


def test_matches_torchrl_iqlloss_when_given_the_same_networks_and_hyperparameters():
    torch.manual_seed(1)
    actor, critics, value = make_iql_networks(3, 2, hidden_sizes=(16, 16))
    kwargs = dict(temperature=2.0, expectile=0.8, loss_function="l2")
    ours = IQLLoss(actor, critics, value, **kwargs)
    theirs = TorchRLIQLLoss(actor, critics, value, **kwargs)
    batch = random_batch()
    truncated = torch.rand(16, 1) < 0.3  # truncations bootstrap in both
    batch.set(("next", "done"), batch.get(("next", "terminated")) | truncated)
    assert (batch["next", "done"] != batch["next", "terminated"]).any()
    a, b = ours(batch.clone()), theirs(batch.clone())
    for key in ("loss_value", "loss_qvalue", "loss_actor", "entropy"):
        assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-6), key


# ---------------------------------------------------------------------------- gradients
def _grad_reaches(loss, scalar):
    groups = {
        "actor": list(loss.actor_network_params.values(True, True)),
        "qvalue": list(loss.qvalue_network_params.values(True, True)),
        "value": list(loss.value_network_params.values(True, True)),
    }
    reached = set()
    for name, params in groups.items():
        grads = torch.autograd.grad(scalar, params, retain_graph=True, allow_unused=True)
        if any(g is not None and g.abs().sum() > 0 for g in grads):
            reached.add(name)
    return reached


@pytest.mark.parametrize("actor_kind", ["gaussian", "deterministic", "categorical"])
def test_each_loss_reaches_only_its_own_network(actor_kind):
    loss = small_loss(actor_kind)
    action = torch.randint(0, 4, (16,)) if actor_kind == "categorical" else None
    out = loss(random_batch(action=action))
    assert _grad_reaches(loss, out["loss_value"]) == {"value"}
    assert _grad_reaches(loss, out["loss_qvalue"]) == {"qvalue"}
    assert _grad_reaches(loss, out["loss_actor"]) == {"actor"}
    assert all(not p.requires_grad for p in loss.target_qvalue_network_params.values(True, True))


def test_critics_are_initialised_independently_from_a_single_module():
    torch.manual_seed(0)
    actor, critics, value = make_iql_networks(3, 2, hidden_sizes=(8,))
    loss = IQLLoss(actor, critics[0], value, num_qvalue_nets=2)
    weight = loss.qvalue_network_params["module", "net", "0", "weight"]
    assert weight.shape[0] == 2 and not torch.equal(weight[0], weight[1])
    assert torch.equal(weight[0], critics[0].module.net[0].weight)


# ---------------------------------------------------------------------------- call counts
def _count_calls(network):
    first = next(m for m in network.modules() if isinstance(m, nn.Linear))
    calls = []
    first.register_forward_hook(lambda *args: calls.append(1))
    return calls


def _counted(loss_cls, **kwargs):
    torch.manual_seed(0)
    actor, critics, value = make_iql_networks(3, 2, hidden_sizes=(8,))
    loss = loss_cls(actor, critics, value, **kwargs)
    counts = {name: _count_calls(getattr(loss, name)) for name in ("actor_network", "qvalue_network", "value_network")}
    return loss, counts


def _snapshot(counts):
    return {name.split("_")[0]: len(calls) for name, calls in counts.items()}


def test_forward_evaluates_each_network_once_per_batch():
    # critics: 1 vmapped call for the targets + 1 for the online ones; V: V(s) and V(s')
    loss, counts = _counted(IQLLoss)
    loss(random_batch())
    assert _snapshot(counts) == {"actor": 1, "qvalue": 2, "value": 2}


def test_torchrl_iqlloss_evaluates_target_critics_and_value_twice():
    loss, counts = _counted(TorchRLIQLLoss)
    loss(random_batch())
    assert _snapshot(counts) == {"actor": 1, "qvalue": 3, "value": 3}


def test_the_paper_order_costs_one_extra_value_pass():
    loss, counts = _counted(IQLLoss)
    batch = random_batch()
    value_out, target_min_q = loss.value_phase(batch)
    assert _snapshot(counts) == {"actor": 0, "qvalue": 1, "value": 1}
    rest = loss.actor_critic_phase(batch, target_min_q)
    # V(s) and V(s') need no gradient here: one call on both, stacked (2B rows)
    assert _snapshot(counts) == {"actor": 1, "qvalue": 2, "value": 2}
    assert set(value_out.keys()) >= {"loss_value", "non_finite"}
    assert set(rest.keys()) >= {"loss_actor", "loss_qvalue", "awr_weight_max"}
    # with V unchanged between the phases, the split equals the fused forward
    fused = loss(batch)
    for key in ("loss_value", "loss_actor", "loss_qvalue"):
        source = value_out if key == "loss_value" else rest
        assert torch.allclose(source[key], fused[key])


# ---------------------------------------------------------------------------- TorchRL interface
def test_custom_keys_via_set_keys_give_the_same_losses():
    torch.manual_seed(0)
    default = small_loss()
    batch = random_batch()
    renamed = batch.clone().rename_key_("action", "act")
    renamed.rename_key_(("next", "reward"), ("next", "rew"))
    renamed.rename_key_(("next", "terminated"), ("next", "term"))
    custom = small_loss()
    custom.set_keys(action="act", reward="rew", terminated="term", priority="prio", log_prob="lp")
    with pytest.raises(KeyError):  # the critic still reads "action"...
        custom(renamed.clone())
    renamed.set("action", renamed["act"])  # ...so give it what its in_keys name
    a, b = default(batch), custom(renamed)
    for key in ("loss_value", "loss_qvalue", "loss_actor"):
        assert torch.allclose(a[key], b[key])
    assert "prio" in renamed.keys() and "lp" in renamed.keys()


def test_reduction_none_keeps_the_batch_shape_and_sum_is_batch_times_mean():
    batch = random_batch()
    mean = small_loss()(batch.clone())
    summed = small_loss(reduction="sum")(batch.clone())
    with pytest.warns(UserWarning, match="scalar_output_mode"):
        none_loss = small_loss(reduction="none")
    per_sample = none_loss(batch.clone())
    assert per_sample.batch_size == batch.batch_size
    for key in ("loss_value", "loss_qvalue", "loss_actor"):
        assert per_sample[key].shape == (16,)
        assert torch.allclose(per_sample[key].mean(), mean[key], rtol=1e-5)
        assert torch.allclose(summed[key], 16 * mean[key], rtol=1e-5)
    assert "entropy" not in per_sample.keys()
    kept = small_loss(reduction="none", scalar_output_mode="non_tensor")(batch.clone())
    assert "awr_weight_max" in kept.keys()


def masked_batch():
    """Three transitions for hand_networks: Q1 = s + 2a, Q2 = s + 0.5, V(s) = s, π(s) = s / 4."""
    return TensorDict(
        {
            "observation": torch.tensor([[1.0], [2.0], [3.0]]),
            "action": torch.tensor([[0.5], [-0.5], [1.0]]),
            ("next", "observation"): torch.tensor([[2.0], [1.0], [0.0]]),
            ("next", "reward"): torch.tensor([[1.0], [2.0], [3.0]]),
            ("next", "terminated"): torch.tensor([[False], [True], [False]]),
            ("next", "done"): torch.tensor([[False], [True], [False]]),
        },
        batch_size=[3],
    )


def hand_losses_per_transition():
    """Eqs. (5)-(7) on masked_batch, worked out in float64 without the library: (value, actor, Q) each [3]."""
    s, a, s2, r, term = [1.0, 2.0, 3.0], [0.5, -0.5, 1.0], [2.0, 1.0, 0.0], [1.0, 2.0, 3.0], [0, 1, 0]
    value, actor, critic = [], [], []
    for i in range(3):
        min_q, v = min(s[i] + 2 * a[i], s[i] + 0.5), s[i]
        u = min_q - v
        value.append((0.7 if u > 0 else 0.3) * u * u)
        actor.append(min(math.exp(3.0 * u), 100.0) * (s[i] / 4 - a[i]) ** 2)
        target = r[i] + 0.99 * (1 - term[i]) * s2[i]
        critic.append((s[i] + 2 * a[i] - target) ** 2 + (s[i] + 0.5 - target) ** 2)
    return {"loss_value": value, "loss_actor": actor, "loss_qvalue": critic}


@pytest.mark.parametrize("mask_key, mask", [(("collector", "mask"), [True, True, False]),
                                            ("shifted_valid", [[True], [True], [False]]),
                                            ("valid", [True, True, False])])
def test_positions_a_validity_mask_drops_count_in_no_loss(mask_key, mask):
    """TorchRL's masks (a padding SliceSampler's ("collector", "mask"), the estimators' "shifted_valid",
    or the entry loss.loss_mask_key names): the mean is over the kept transitions, in all three losses."""
    per_transition = hand_losses_per_transition()
    loss = IQLLoss(*hand_networks())
    if mask_key == "valid":
        loss.loss_mask_key = "valid"
    out = loss(masked_batch().set(mask_key, torch.tensor(mask)))
    for key, values in per_transition.items():
        kept = (values[0] + values[1]) / 2
        assert out[key].item() == pytest.approx(kept, rel=1e-6), key
        assert kept != pytest.approx(sum(values) / 3, rel=1e-3), key  # the mask ignored
        assert kept != pytest.approx((values[0] + values[1]) / 3, rel=1e-3), key  # zeroed, not dropped
    loss.reduction = "none"
    out = loss(masked_batch().set(mask_key, torch.tensor(mask)))
    for key, values in per_transition.items():
        assert out[key].tolist() == pytest.approx([values[0], values[1], 0.0], rel=1e-6), key
    loss.reduction, loss.loss_mask_key = "mean", None  # no masking: every transition counts
    out = loss(masked_batch().set(mask_key, torch.tensor(mask)))
    for key, values in per_transition.items():
        assert out[key].item() == pytest.approx(sum(values) / 3, rel=1e-6), key


def test_the_diagnostics_average_over_the_positions_a_mask_keeps_too():
    """value_mean, min_q_mean, q_mean and the advantage and AWR-weight summaries, by hand in float64 over the two
    kept transitions of masked_batch (β = 10, the first action 0.1); the dropped third one has the largest
    advantage, a clamped weight, so a mask ignored shows in every summary."""
    beta, s, a = 10.0, [1.0, 2.0, 3.0], [0.1, -0.5, 1.0]
    q1, q2 = [s[i] + 2 * a[i] for i in range(3)], [s[i] + 0.5 for i in range(3)]
    min_q = [min(x, y) for x, y in zip(q1, q2)]
    advantage = [min_q[i] - s[i] for i in range(3)]  # 0.2, -1, 0.5
    weight = [min(math.exp(beta * u), 100.0) for u in advantage]  # e^2, e^-10, 100 (e^5 clamped)
    expected = {"value_mean": (s[0] + s[1]) / 2, "min_q_mean": (min_q[0] + min_q[1]) / 2,
                "q_mean": (q1[0] + q1[1] + q2[0] + q2[1]) / 4, "advantage_mean": (advantage[0] + advantage[1]) / 2,
                "awr_weight_mean": (weight[0] + weight[1]) / 2, "awr_weight_max": max(weight[:2]),
                "awr_weight_clamped_frac": 0.0}
    everywhere = {"value_mean": sum(s) / 3, "min_q_mean": sum(min_q) / 3, "q_mean": (sum(q1) + sum(q2)) / 6,
                  "advantage_mean": sum(advantage) / 3, "awr_weight_mean": sum(weight) / 3,
                  "awr_weight_max": max(weight), "awr_weight_clamped_frac": 1 / 3}
    batch = masked_batch().set("action", torch.tensor([[a[0]], [a[1]], [a[2]]]))
    out = IQLLoss(*hand_networks(), temperature=beta)(batch.set(("collector", "mask"), torch.tensor([True, True, False])))
    for key, value in expected.items():
        assert out[key].item() == pytest.approx(value, rel=1e-6, abs=1e-7), key
        assert value != pytest.approx(everywhere[key], rel=1e-3), key  # the mask ignored


def test_a_masked_padding_moves_no_diagnostic_of_a_stochastic_actor():
    """The entropy and every other summary of a Gaussian actor's batch padded with garbage that a mask drops
    equal the unpadded batch's."""
    loss = small_loss()
    batch = random_batch(batch=12)
    padding = random_batch(batch=4).apply(lambda x: x * 50 if x.is_floating_point() else x)
    padded = torch.cat([batch, padding]).set(("collector", "mask"), torch.arange(16) < 12)
    plain, masked, unmasked = loss(batch.clone()), loss(padded.clone()), loss(padded.exclude(("collector", "mask")))
    for key in ("entropy", "value_mean", "min_q_mean", "q_mean", "advantage_mean", "awr_weight_mean",
                "awr_weight_max", "awr_weight_clamped_frac", "loss_actor", "loss_value", "loss_qvalue"):
        assert masked[key].item() == pytest.approx(plain[key].item(), rel=1e-5, abs=1e-6), key
        if key not in ("awr_weight_max", "awr_weight_clamped_frac"):  # the garbage's advantages happen to be low
            assert unmasked[key].item() != pytest.approx(plain[key].item(), rel=1e-3), key  # the mask ignored


def test_a_mask_that_is_not_bool_names_the_entry():
    batch = masked_batch().set(("collector", "mask"), torch.tensor([1.0, 1.0, 0.0]))
    with pytest.raises(TypeError, match=r"validity mask \('collector', 'mask'\) is torch.float32.*bool"):
        IQLLoss(*hand_networks())(batch)


def test_priority_and_log_prob_are_written_into_the_input():
    loss = IQLLoss(*hand_networks(), reduction="none", scalar_output_mode="exclude")
    batch = hand_batch()
    loss(batch)
    # max over critics of the squared TD error: [max(0.9604, 2.1904), max(1, 0.25)]
    assert torch.allclose(batch["td_error"], torch.tensor([2.1904, 1.0]))
    gaussian = small_loss()
    batch = random_batch()
    out = gaussian(batch)
    assert torch.allclose(out["entropy"], -batch["_log_prob"].mean())


def test_state_dict_round_trip_restores_the_losses_and_the_targets():
    source = small_loss()
    with torch.no_grad():
        source.target_qvalue_network_params.apply_(lambda p: p.mul_(0.5))
    torch.manual_seed(123)
    actor, critics, value = make_iql_networks(3, 2, hidden_sizes=(16, 16))
    restored = IQLLoss(actor, critics, value)
    batch = random_batch()
    source(batch.clone())  # a loss that has run loads into one that has not
    assert source.state_dict().keys() == restored.state_dict().keys()
    assert not torch.allclose(source(batch.clone())["loss_value"], restored(batch.clone())["loss_value"])
    restored.load_state_dict(source.state_dict())
    a, b = source(batch.clone()), restored(batch.clone())
    for key in ("loss_value", "loss_qvalue", "loss_actor"):
        assert torch.equal(a[key], b[key])


def test_reset_parameters_recursive_reinitialises_the_networks():
    loss = small_loss()
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    loss.reset_parameters_recursive()
    after = loss.state_dict()
    changed = [k for k in before if before[k].shape == after[k].shape and not torch.equal(before[k], after[k])]
    assert any("actor" in k for k in changed) and any("value_network" in k for k in changed)


def test_soft_and_hard_updates_move_the_target_critics():
    loss = small_loss()
    soft = SoftUpdate(loss, tau=0.005)
    with torch.no_grad():
        loss.qvalue_network_params.apply_(lambda p: p.add_(1.0))
    online = loss.qvalue_network_params.detach().clone()
    target = loss.target_qvalue_network_params.clone()
    soft.step()  # target <- 0.995 target + 0.005 online: every entry moves by 0.005
    moved = loss.target_qvalue_network_params - target
    assert all(torch.allclose(d, torch.full_like(d, 0.005), atol=1e-6) for d in moved.values(True, True))
    HardUpdate(loss).step()
    assert (loss.target_qvalue_network_params == online).all()


def test_gamma_is_set_by_make_value_estimator():
    loss = IQLLoss(*hand_networks(), reduction="none", scalar_output_mode="exclude")
    loss.make_value_estimator(ValueEstimators.TD0, gamma=0.5)
    out = loss(hand_batch())
    target = torch.tensor([1.0 + 0.5 * 2.0, 2.0])
    q1, q2 = torch.tensor([2.0, 1.0]), torch.tensor([1.5, 2.5])
    assert torch.allclose(out["loss_qvalue"], (q1 - target) ** 2 + (q2 - target) ** 2)
    with pytest.raises(TypeError, match="make_value_estimator"):
        IQLLoss(*hand_networks(), gamma=0.9)


def trajectory_batch():
    """One trajectory of 5 steps for the hand networks: a truncation at t=1, a termination at t=3."""
    s = torch.tensor([1.0, 2.0, 0.5, -1.0, 3.0])
    columns = {
        "observation": s, "action": torch.tensor([0.5, -0.5, 0.25, 1.0, 0.0]),
        ("next", "observation"): torch.tensor([2.0, 0.5, -1.0, 3.0, 1.5]),
        ("next", "reward"): torch.tensor([1.0, 2.0, -1.0, 0.5, 1.0]),
        ("next", "terminated"): torch.tensor([False, False, False, True, False]),
        ("next", "done"): torch.tensor([False, True, False, True, False]),
    }
    return TensorDict({k: v.view(1, 5, 1) for k, v in columns.items()}, [1, 5], names=[None, "time"])


@pytest.mark.parametrize("estimator, lmbda", [(ValueEstimators.TD1, 1.0), (ValueEstimators.TDLambda, 0.8)])
def test_multi_step_estimators_regress_q_onto_hand_lambda_returns(estimator, lmbda):
    loss = IQLLoss(*hand_networks(), reduction="none", scalar_output_mode="exclude")
    loss.make_value_estimator(estimator, gamma=0.9, **({} if estimator == ValueEstimators.TD1 else {"lmbda": lmbda}))
    batch = trajectory_batch()
    got = loss(batch.clone())["loss_qvalue"].reshape(-1)
    flat = {k: batch[k].reshape(-1) for k in ("observation", "action")}
    nxt = {k: batch["next", k].reshape(-1).tolist() for k in ("observation", "reward", "terminated", "done")}
    q1, q2 = flat["observation"] + 2 * flat["action"], flat["observation"] + 0.5  # V(s') = s'
    lam = torch.tensor(lambda_returns(nxt["reward"], nxt["observation"], nxt["terminated"], nxt["done"], 0.9, lmbda))
    one_step = torch.tensor(lambda_returns(nxt["reward"], nxt["observation"], nxt["terminated"], nxt["done"], 0.9, 0.0))
    assert torch.allclose(got, (q1 - lam) ** 2 + (q2 - lam) ** 2, rtol=1e-5)
    # the estimator ignored (TD(0)) would give other numbers: at t=0 and t=2 by more than 1
    wrong = (q1 - one_step) ** 2 + (q2 - one_step) ** 2
    assert (got - wrong).abs().max() > 1.0


# ---------------------------------------------------------------------------- actors
def test_tanh_normal_actor_trains():
    loss = small_loss("tanh_normal")
    batch = random_batch(action=(torch.rand(16, 2) * 2 - 1) * 0.99)
    out = loss(batch)
    out["loss_actor"].backward()
    assert torch.isfinite(out["loss_actor"])


def test_categorical_actions_of_shape_b_and_b1_give_the_same_loss():
    index = torch.randint(0, 4, (16,))
    batch = random_batch(action=index)
    flat = small_loss("categorical")(batch.clone())
    column = small_loss("categorical")(batch.clone().set("action", index.unsqueeze(-1)))
    for key in ("loss_value", "loss_qvalue", "loss_actor"):
        assert torch.allclose(flat[key], column[key])


def test_one_hot_actions_match_categorical_indices():
    index = torch.randint(0, 4, (16,))
    batch = random_batch(action=index)
    categorical = small_loss("categorical")(batch.clone())
    one_hot_loss = small_loss("one_hot")
    one_hot = one_hot_loss(batch.clone().set("action", nn.functional.one_hot(index, 4)))
    for key in ("loss_value", "loss_qvalue", "loss_actor"):
        assert torch.allclose(categorical[key], one_hot[key], rtol=1e-5)


def test_discrete_loss_needs_an_action_space():
    actor, critics, value = make_iql_networks(3, 4, actor_kind="categorical", hidden_sizes=(8,))
    with pytest.raises(ValueError, match="action_space"):
        DiscreteIQLLoss(actor, critics, value)


# ---------------------------------------------------------------------------- bad input
def test_a_missing_key_names_the_key_and_the_set_keys_call():
    batch = random_batch()
    batch.rename_key_(("next", "terminated"), ("next", "is_terminal"))
    with pytest.raises(KeyError, match=r"set_keys\(terminated="):
        small_loss()(batch)
    batch = random_batch().exclude("action")
    with pytest.raises(KeyError, match=r"set_keys\(action="):
        small_loss()(batch)
    batch = random_batch().exclude(("next", "observation"))
    with pytest.raises(KeyError, match="value network"):
        small_loss()(batch)


def test_mismatched_batch_shapes_fail_on_the_first_call():
    batch = random_batch()
    unbatched = TensorDict({k: v for k, v in batch.items(True, True)}, batch_size=[])
    unbatched.set(("next", "reward"), torch.randn(15, 1))
    with pytest.raises(ValueError, match="reward"):
        small_loss()(unbatched)
    unbatched = TensorDict({k: v for k, v in batch.items(True, True)}, batch_size=[])
    unbatched.set("action", torch.randn(15, 2))
    with pytest.raises(ValueError, match="action"):
        small_loss()(unbatched)
    unbatched = TensorDict({k: v for k, v in batch.items(True, True)}, batch_size=[])
    unbatched.set(("next", "reward"), torch.randn(16))  # [B] is accepted as well as [B, 1]
    assert torch.isfinite(small_loss()(unbatched)["loss_qvalue"])


def test_non_finite_losses_raise_a_device_side_flag():
    batch = random_batch()
    batch["next", "reward"][3] = float("nan")
    out = small_loss()(batch)
    assert out["non_finite"].dtype == torch.bool and bool(out["non_finite"])
    assert not small_loss()(random_batch())["non_finite"]


def test_bad_hyperparameters_are_refused():
    actor, critics, value = make_iql_networks(3, 2, hidden_sizes=(8,))
    with pytest.raises(ValueError, match="expectile"):
        IQLLoss(actor, critics, value, expectile=1.0)
    with pytest.raises(ValueError, match="reduction"):
        IQLLoss(actor, critics, value, reduction="max")


def test_keyword_call_returns_the_tuple_torchrl_scripts_unpack():
    loss = small_loss()
    b = random_batch()
    loss_actor, loss_qvalue, loss_value, entropy = loss(
        observation=b["observation"], action=b["action"], next_observation=b["next", "observation"],
        next_reward=b["next", "reward"], next_done=b["next", "done"], next_terminated=b["next", "terminated"],
    )
    assert torch.allclose(loss_value, loss(b.clone())["loss_value"])


def test_separate_losses_keeps_shared_trunk_gradients_to_the_actor():
    trunk = nn.Linear(3, 8)
    actor = TensorDictModule(nn.Sequential(trunk, nn.ReLU(), nn.Linear(8, 2), nn.Tanh()), ["observation"], ["action"])
    value = TensorDictModule(nn.Sequential(trunk, nn.ReLU(), nn.Linear(8, 1)), ["observation"], ["state_value"])
    _, critics, _ = make_iql_networks(3, 2, hidden_sizes=(8,))
    shared_weight = trunk.weight
    for separate, expected in ((True, False), (False, True)):
        loss = IQLLoss(actor, critics, value, separate_losses=separate)
        value_params = list(loss.value_network_params.values(True, True))
        trainable = [p for p in value_params if isinstance(p, nn.Parameter) and p.requires_grad]
        assert any(p.data_ptr() == shared_weight.data_ptr() for p in trainable) is expected


# ---------------------------------------------------------------------------- the user's critic weights
def test_a_single_critic_with_one_critic_is_used_exactly_as_given():
    torch.manual_seed(0)
    actor, critics, value = make_iql_networks(3, 2, hidden_sizes=(8,))
    loss = IQLLoss(actor, critics[0], value, num_qvalue_nets=1)
    given = read(TensorDict.from_module(critics[0]))
    for params in (loss.qvalue_network_params, loss.target_qvalue_network_params):
        got = read(params)
        assert got.keys() == given.keys()
        assert all(torch.equal(got[k][0], given[k]) for k in given)
    batch = random_batch()
    q = critics[0](batch.clone())["state_action_value"].squeeze(-1)
    per_sample = IQLLoss(actor, critics[0], value, num_qvalue_nets=1, reduction="none", scalar_output_mode="exclude")
    per_sample(batch)  # writes the TD error of the one critic: (Q − target)²
    assert torch.allclose(batch["td_error"], (q - bellman_target(
        batch["next", "reward"].squeeze(-1), batch["next", "terminated"].squeeze(-1),
        value(batch["next"].clone())["state_value"].squeeze(-1), 0.99)).detach() ** 2, rtol=1e-5)


def test_copies_of_one_critic_keep_its_weights_in_copy_0_and_draw_fresh_ones_for_the_rest():
    torch.manual_seed(0)
    actor, critics, value = make_iql_networks(3, 2, hidden_sizes=(8,))
    loss = IQLLoss(actor, critics[0], value, num_qvalue_nets=3)
    given = read(TensorDict.from_module(critics[0]))
    got = read(loss.qvalue_network_params)
    for key in given:
        assert torch.equal(got[key][0], given[key]), key
        for i, j in ((0, 1), (0, 2), (1, 2)):
            assert not torch.equal(got[key][i], got[key][j]), (key, i, j)


def test_a_critic_with_layer_norm_copies_fine_its_constant_init_is_reached_by_reset_parameters():
    torch.manual_seed(0)
    critic = make_qvalue_networks(3, 2, num_nets=1, hidden_sizes=(8,), layer_norm=True)[0]
    actor, _, value = make_iql_networks(3, 2, hidden_sizes=(8,))
    loss = IQLLoss(actor, critic, value, num_qvalue_nets=2)
    weight = loss.qvalue_network_params["module", "net", "0", "weight"]
    assert not torch.equal(weight[0], weight[1])


class BareCritic(nn.Module):
    """Q(s, a) = w·[s, a] + b with bare parameters: no reset_parameters reaches them."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(5))
        self.b = nn.Parameter(torch.zeros(1))

    def forward(self, observation, action):
        return (torch.cat([observation, action], -1) * self.w).sum(-1, keepdim=True) + self.b


def test_copies_that_would_be_identical_are_refused_with_the_fix():
    actor, _, value = make_iql_networks(3, 2, hidden_sizes=(8,))
    critic = TensorDictModule(BareCritic(), ["observation", "action"], ["state_action_value"])
    with pytest.raises(ValueError, match=r"'module.w'.*Pass a list of 2 critics"):
        IQLLoss(actor, critic, value, num_qvalue_nets=2)
    IQLLoss(actor, critic, value, num_qvalue_nets=1)  # one critic: nothing to copy
    listed = [critic, TensorDictModule(BareCritic(), ["observation", "action"], ["state_action_value"])]
    loss = IQLLoss(actor, listed, value, num_qvalue_nets=2)  # a list is used as given
    assert torch.equal(loss.qvalue_network_params["module", "w"][0], listed[0].module.w)
    assert torch.equal(loss.qvalue_network_params["module", "w"][1], listed[1].module.w)


# ---------------------------------------------------------------------------- separate_losses
class SharedTrunkCritic(nn.Module):
    def __init__(self, trunk):
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(10, 1)

    def forward(self, observation, action):
        return self.head(torch.cat([self.trunk(observation).relu(), action], -1))


def shared_trunk_networks():
    """Actor (TanhNormal), critic and value sharing one trunk, each with its own head."""
    from torchrl.modules import NormalParamExtractor, ProbabilisticActor, TanhNormal

    torch.manual_seed(0)
    trunk = nn.Linear(3, 8)
    actor = ProbabilisticActor(
        TensorDictModule(nn.Sequential(trunk, nn.ReLU(), nn.Linear(8, 4), NormalParamExtractor()),
                         ["observation"], ["loc", "scale"]),
        in_keys=["loc", "scale"], distribution_class=TanhNormal)
    critic = TensorDictModule(SharedTrunkCritic(trunk), ["observation", "action"], ["state_action_value"])
    value = TensorDictModule(nn.Sequential(trunk, nn.ReLU(), nn.Linear(8, 1)), ["observation"], ["state_value"])
    return trunk, actor, critic, value


def _gradient_receivers(loss, scalar, trunk):
    """Which of trunk / actor head / critic head / value head a loss sends gradient into.

    Every tensor the loss holds is asked (trainable or not): a detached copy of the trunk that
    became a leaf again would show here."""
    tensors = {}
    for name in ("actor_network_params", "qvalue_network_params", "value_network_params"):
        for key, tensor in getattr(loss, name).items(True, True):
            tensors[(name, key)] = tensor
    trunk_ptrs = {trunk.weight.data_ptr(), trunk.bias.data_ptr()}
    leaves = {k: t for k, t in tensors.items() if t.requires_grad}
    grads = torch.autograd.grad(scalar, list(leaves.values()), retain_graph=True, allow_unused=True)
    reached = set()
    for ((name, key), tensor), grad in zip(leaves.items(), grads):
        if grad is None or not grad.abs().sum() > 0:
            continue
        if tensor.data_ptr() in trunk_ptrs:
            reached.add("trunk")
        elif name == "qvalue_network_params" and "trunk" in key:
            reached.add("critic's own trunk")
        else:
            reached.add(name.split("_")[0] + " head")
    return reached


@pytest.mark.parametrize("separate, expected", [
    # TorchRL's semantics: shared parameters are trained by the actor loss only
    (True, {"loss_value": {"value head"}, "loss_qvalue": {"qvalue head"}, "loss_actor": {"trunk", "actor head"}}),
    # without it the value loss trains the trunk it shares, the critics get trunks of their own
    (False, {"loss_value": {"trunk", "value head"}, "loss_qvalue": {"critic's own trunk", "qvalue head"},
             "loss_actor": {"trunk", "actor head"}}),
])
def test_separate_losses_decides_which_loss_trains_a_shared_trunk(separate, expected):
    trunk, actor, critic, value = shared_trunk_networks()
    loss = IQLLoss(actor, critic, value, separate_losses=separate)
    batch = random_batch(action=(torch.rand(16, 2) * 2 - 1) * 0.9)
    for _ in range(2):  # the second call sees whatever the first call's functional swaps left behind
        out = loss(batch.clone())
    for name, receivers in expected.items():
        assert _gradient_receivers(loss, out[name], trunk) == receivers, name


def test_separate_losses_critics_follow_the_actors_trunk():
    trunk, actor, critic, value = shared_trunk_networks()
    loss = IQLLoss(actor, critic, value, separate_losses=True)
    with torch.no_grad():
        trunk.weight.add_(1.0)  # an actor step on the trunk is seen by every critic copy
    stacked = loss.qvalue_network_params["module", "trunk", "weight"]
    assert stacked.shape[0] == 2 and all(torch.equal(stacked[i], trunk.weight) for i in range(2))
    heads = loss.qvalue_network_params["module", "head", "weight"]
    assert torch.equal(heads[0], critic.module.head.weight) and not torch.equal(heads[0], heads[1])


# ---------------------------------------------------------------------------- construct, then set_keys
def renamed_networks():
    torch.manual_seed(0)
    actor, critics, value = make_iql_networks(3, 2, hidden_sizes=(8,))
    for critic in critics:
        critic.out_keys = ["q_test"]
    value.out_keys = ["value_test"]
    return actor, critics, value


def test_networks_with_other_output_keys_construct_then_take_set_keys():
    loss = IQLLoss(*renamed_networks())  # TorchRL's order: construct first...
    batch = random_batch()
    with pytest.raises(KeyError, match=r"'state_value'.*value network.*set_keys\(value="):
        loss(batch.clone())
    loss.set_keys(value="value_test")
    with pytest.raises(KeyError, match=r"'state_action_value'.*set_keys\(state_action_value="):
        loss(batch.clone())
    loss.set_keys(state_action_value="q_test")  # ...then name the keys
    torch.manual_seed(0)
    default = IQLLoss(*make_iql_networks(3, 2, hidden_sizes=(8,)))
    a, b = loss(batch.clone()), default(batch.clone())
    for key in ("loss_value", "loss_qvalue", "loss_actor"):
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------------------- what kind of actor
def torchrl_actors():
    """Each actor on the hand batch: π(s) = 0.25·s (deterministic), or loc = 0.25·s, scale = 0.5."""
    from torchrl.modules import Actor, ProbabilisticActor, TanhNormal
    from torch.distributions import Normal

    class LocScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.loc = linear([0.25])

        def forward(self, observation):
            loc = self.loc(observation)
            return loc, torch.full_like(loc, 0.5)

    def probabilistic(distribution, **kwargs):
        return ProbabilisticActor(TensorDictModule(LocScale(), ["observation"], ["loc", "scale"]),
                                  in_keys=["loc", "scale"], distribution_class=distribution, **kwargs)

    return {
        "torchrl Actor": Actor(linear([0.25]), in_keys=["observation"]),
        "TensorDictModule": TensorDictModule(linear([0.25]), ["observation"], ["action"]),
        "ProbabilisticActor Normal": probabilistic(Normal),
        "ProbabilisticActor TanhNormal": probabilistic(TanhNormal, distribution_kwargs={"low": -1.0, "high": 1.0}),
    }


def hand_log_prob(kind, s, a):
    loc, scale = 0.25 * s, 0.5
    if kind.endswith("TanhNormal"):
        u = math.atanh(a)
        return -0.5 * ((u - loc) / scale) ** 2 - math.log(scale) - 0.5 * math.log(2 * math.pi) - math.log(1 - a * a)
    return -0.5 * ((a - loc) / scale) ** 2 - math.log(scale) - 0.5 * math.log(2 * math.pi)


@pytest.mark.parametrize("kind", list(torchrl_actors()))
def test_every_kind_of_torchrl_actor_gets_its_own_objective(kind):
    # weights exp(3·[0.5, −1]) on the hand batch (s = [1, 2], a = [0.5, −0.5])
    actor = torchrl_actors()[kind]
    out = IQLLoss(*hand_networks(actor))(hand_batch())
    weights = [math.exp(1.5), math.exp(-3.0)]
    if kind in ("torchrl Actor", "TensorDictModule"):  # squared error to the dataset action
        expected = (weights[0] * (0.25 - 0.5) ** 2 + weights[1] * (0.5 + 0.5) ** 2) / 2
        assert "entropy" not in out.keys()
    else:  # −w·log π(a|s)
        expected = -(weights[0] * hand_log_prob(kind, 1.0, 0.5) + weights[1] * hand_log_prob(kind, 2.0, -0.5)) / 2
    assert math.isfinite(out["loss_actor"].item())
    assert out["loss_actor"].item() == pytest.approx(expected, rel=1e-5)


def test_the_papers_gaussian_has_a_tanh_mean_and_a_clipped_log_std():
    # non-zero weights (so the tanh matters) and log-std components outside [−5, 2]
    torch.manual_seed(0)
    actor = make_actor(3, 2, hidden_sizes=(8,))
    with torch.no_grad():
        actor.module[0].module.log_std.copy_(torch.tensor([2.7, -6.0]))
        for p in actor.module[0].module.net.parameters():
            p.mul_(3.0)  # pre-tanh means well beyond ±1
    _, critics, value = make_iql_networks(3, 2, hidden_sizes=(8,))
    loss = IQLLoss(actor, critics, value, temperature=0.0)  # β = 0: loss_actor = −mean log π(a|s)
    batch = random_batch()
    got = loss(batch)["loss_actor"].item()
    params = read(loss.actor_network_params)
    s, a = batch["observation"].double(), batch["action"].double()
    expected = -gaussian_log_prob(params, s, a).mean().item()
    assert got == pytest.approx(expected, rel=1e-5)
    for wrong in ("untanhed_mean", "unclipped_log_std"):
        assert -gaussian_log_prob(params, s, a, wrong).mean().item() != pytest.approx(expected, rel=1e-2), wrong


# ---------------------------------------------------------------------------- discrete actions by hand
def discrete_hand_networks():
    """Q1(s, ·) = s·[1, 2, 3], Q2(s, ·) = s·[1.5, 1, 2.5], V(s) = s, logits(s) = s·[1, 0, −1]."""
    def per_action(weights):
        layer = nn.Linear(1, len(weights))
        with torch.no_grad():
            layer.weight.copy_(torch.tensor(weights).unsqueeze(-1))
            layer.bias.zero_()
        return layer

    from torchrl.modules import ProbabilisticActor

    q1 = TensorDictModule(per_action([1.0, 2.0, 3.0]), ["observation"], ["state_action_value"])
    q2 = TensorDictModule(per_action([1.5, 1.0, 2.5]), ["observation"], ["state_action_value"])
    value = TensorDictModule(linear([1.0]), ["observation"], ["state_value"])
    actor = ProbabilisticActor(TensorDictModule(per_action([1.0, 0.0, -1.0]), ["observation"], ["logits"]),
                               in_keys=["logits"], distribution_class=torch.distributions.Categorical)
    return actor, [q1, q2], value


def test_discrete_losses_use_q_of_the_dataset_action_and_its_log_probability():
    # s = [1, 2], dataset actions [0, 1] (neither greedy for Q nor for π)
    batch = hand_batch()
    batch.set("action", torch.tensor([0, 1]))
    out = DiscreteIQLLoss(*discrete_hand_networks(), action_space="categorical")(batch)
    # min_i Q_i(s, a): [min(1, 1.5), min(4, 2)] = [1, 2]; V = [1, 2]; advantages [0, 0]
    assert out["loss_value"].item() == pytest.approx(0.0, abs=1e-7)
    log_pi = [math.log(math.exp(1) / (math.exp(1) + 1 + math.exp(-1))),   # s = 1, a = 0
              math.log(1 / (math.exp(2) + 1 + math.exp(-2)))]              # s = 2, a = 1
    assert out["loss_actor"].item() == pytest.approx(-(log_pi[0] + log_pi[1]) / 2, rel=1e-6)
    # the wrong variants: max_a Q (max_a min_i Q = [2.5, 5]) would give loss_value 0.7·(1.5² + 3²)/2 ...
    assert out["loss_value"].item() != pytest.approx(0.7 * (1.5**2 + 3.0**2) / 2, abs=1.0)
    # ... and the greedy action's log-probability (a = 0 in both rows) another actor loss
    greedy = [log_pi[0], math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-2)))]
    assert -(greedy[0] + greedy[1]) / 2 != pytest.approx(out["loss_actor"].item(), rel=1e-2)


def test_bool_one_hot_actions_give_the_categorical_losses():
    index = torch.randint(0, 4, (16,))
    batch = random_batch(action=index)
    categorical = small_loss("categorical")(batch.clone())
    for dtype in (torch.bool, torch.long, torch.float32):
        one_hot = small_loss("one_hot")(batch.clone().set("action", nn.functional.one_hot(index, 4).to(dtype)))
        for key in ("loss_value", "loss_qvalue", "loss_actor"):
            assert torch.allclose(categorical[key], one_hot[key], rtol=1e-5), (dtype, key)


@pytest.mark.parametrize("action_space", ["categorical", "one_hot"])
def test_discrete_loss_matches_torchrl_number_for_number(action_space):
    from torchrl.objectives import DiscreteIQLLoss as TorchRLDiscreteIQLLoss

    torch.manual_seed(3)
    actor, critics, value = make_iql_networks(3, 4, actor_kind=action_space, hidden_sizes=(16,))
    kwargs = dict(action_space=action_space, temperature=2.0, expectile=0.8, loss_function="l2")
    ours, theirs = DiscreteIQLLoss(actor, critics, value, **kwargs), TorchRLDiscreteIQLLoss(actor, critics, value, **kwargs)
    index = torch.randint(0, 4, (16,))
    batch = random_batch(action=index if action_space == "categorical" else nn.functional.one_hot(index, 4))
    truncated = torch.rand(16, 1) < 0.3  # truncations bootstrap in both
    batch.set(("next", "done"), batch.get(("next", "terminated")) | truncated)
    assert (batch["next", "done"] != batch["next", "terminated"]).any()
    a, b = ours(batch.clone()), theirs(batch.clone())
    # equal to the last float32 bit or two: a GEMM kernel other than the AVX-512 one (e.g. MKL_ENABLE_INSTRUCTIONS=AVX2
    # on an Intel CPU) rounds one sum of V's loss 1 ulp apart (9e-8 relative)
    close = dict(rtol=2.5e-7, atol=0.0)
    for key in ("loss_value", "loss_qvalue", "loss_actor", "entropy"):
        torch.testing.assert_close(a[key], b[key], **close, msg=key)
    # the wrong variant: TorchRL's loss at the expectile mirrored (1 - τ) is far outside that
    mirrored = TorchRLDiscreteIQLLoss(actor, critics, value, **{**kwargs, "expectile": 0.2})(batch.clone())
    assert not torch.allclose(a["loss_value"], mirrored["loss_value"], **close)


# ---------------------------------------------------------------------------- input checks a TorchRL user expects
def test_an_action_of_the_wrong_size_names_action_and_the_expected_size():
    batch = random_batch(action=torch.rand(16, 3) * 2 - 1)  # the networks take action_dim = 2
    with pytest.raises(ValueError, match=r"'action'.*actor's spec.*action_dim = 2"):
        small_loss()(batch.clone())  # the paper's Gaussian declares its spec
    with pytest.raises(ValueError, match=r"'action'.*critic's input layer.*action_dim = 2"):
        small_loss("deterministic")(batch.clone())  # no spec: the critic's first layer tells


def test_the_action_size_check_stays_out_of_the_way_when_nothing_declares_a_size():
    class AnyActionCritic(nn.Module):  # Q(s, a) = s·w + Σ a: any action size works
        def __init__(self):
            super().__init__()
            self.w = nn.Linear(3, 1)

        def forward(self, observation, action):
            return self.w(observation) + action.sum(-1, keepdim=True)

    actor = TensorDictModule(nn.Linear(3, 5), ["observation"], ["action"])
    critics = [TensorDictModule(AnyActionCritic(), ["observation", "action"], ["state_action_value"]) for _ in range(2)]
    value = TensorDictModule(nn.Linear(3, 1), ["observation"], ["state_value"])
    out = IQLLoss(actor, critics, value)(random_batch(action=torch.rand(16, 5)))
    assert torch.isfinite(out["loss_actor"])


class CriticWithAnInFeaturesOfItsOwn(nn.Module):
    """A user's critic whose ``in_features`` is the observation's width, not its input layer's."""

    def __init__(self):
        super().__init__()
        self.in_features = 3
        self.layer = nn.Linear(3 + 2, 1)

    def forward(self, observation, action):
        return self.layer(torch.cat([observation, action], -1))


def test_a_critic_attribute_named_in_features_is_not_taken_for_its_input_layer():
    torch.manual_seed(0)
    actor = TensorDictModule(nn.Linear(3, 2), ["observation"], ["action"])  # no spec: nothing declares a size
    critics = [TensorDictModule(CriticWithAnInFeaturesOfItsOwn(), ["observation", "action"], ["state_action_value"])
               for _ in range(2)]
    value = TensorDictModule(nn.Linear(3, 1), ["observation"], ["state_value"])
    batch = random_batch()
    out = IQLLoss(actor, critics, value)(batch.clone())
    for critic in critics:
        del critic.module.in_features
    assert out["loss_qvalue"] == IQLLoss(actor, critics, value)(batch.clone())["loss_qvalue"]


def test_torchrls_mlp_as_critic_still_tells_the_action_size():
    actor = TensorDictModule(nn.Linear(3, 2), ["observation"], ["action"])
    critics = [TensorDictModule(MLP(in_features=5, out_features=1, num_cells=[8]), ["observation", "action"],
                                ["state_action_value"]) for _ in range(2)]
    value = TensorDictModule(nn.Linear(3, 1), ["observation"], ["state_value"])
    with pytest.raises(ValueError, match=r"'action'.*critic's input layer \(5 features.*action_dim = 2"):
        IQLLoss(actor, critics, value)(random_batch(action=torch.rand(16, 3)))


@pytest.mark.parametrize("actor_kind, action_space", [("one_hot", "categorical"), ("categorical", "one_hot")])
def test_a_discrete_actor_of_the_other_kind_than_action_space_is_named(actor_kind, action_space):
    torch.manual_seed(0)
    actor, critics, value = make_iql_networks(3, 4, actor_kind=actor_kind, hidden_sizes=(16, 16))
    loss = DiscreteIQLLoss(actor, critics, value, action_space=action_space)
    index = torch.randint(0, 4, (16,))
    batch = random_batch(action=index if action_space == "categorical" else nn.functional.one_hot(index, 4))
    other = "OneHotCategorical" if actor_kind == "categorical" else "Categorical"
    with pytest.raises(TypeError, match=rf"actor's distribution .*action_space='{action_space.replace('_', '-')}'.*{other}"):
        loss(batch)


def test_float64_data_with_float32_networks_names_both_dtypes():
    batch = random_batch().apply(lambda x: x.double() if x.is_floating_point() else x)
    loss = small_loss()
    with pytest.raises(TypeError, match=r"'observation' is torch.float64.*torch.float32"):
        loss(batch)
    assert torch.isfinite(loss.double()(batch)["loss_actor"])  # the same loss, cast after a check, takes it
    with pytest.raises(TypeError, match=r"'observation' is torch.float32.*torch.float64"):
        loss(random_batch())


def test_categorical_actions_must_be_integer_indices():
    batch = random_batch(action=torch.randint(0, 4, (16,)).float())
    with pytest.raises(TypeError, match=r"'action' is torch.float32.*integer indices"):
        small_loss("categorical")(batch)


def test_one_hot_actions_of_the_wrong_width_name_the_number_of_actions():
    batch = random_batch(action=nn.functional.one_hot(torch.randint(0, 3, (16,)), 3))
    with pytest.raises(ValueError, match=r"'action'.*4"):
        small_loss("one_hot")(batch)


def test_rewards_c_times_larger_act_like_a_temperature_c_times_larger():
    # eq. (7) sees β·(Q − V): critics and V whose outputs are all doubled (as after training on
    # doubled rewards) give the actor the weights β = 6 gives the original ones
    doubled = hand_networks()
    for network in (*doubled[1], doubled[2]):
        with torch.no_grad():
            for p in network.parameters():
                p.mul_(2.0)
    a = IQLLoss(*doubled, temperature=3.0)(hand_batch())
    b = IQLLoss(*hand_networks(), temperature=6.0)(hand_batch())
    assert a["loss_actor"].item() == pytest.approx(b["loss_actor"].item(), rel=1e-6)
    assert a["loss_actor"].item() != pytest.approx(IQLLoss(*hand_networks(), temperature=3.0)(hand_batch())["loss_actor"].item(), rel=1e-2)


def test_the_three_whole_objectives_on_hand_numbers():
    """equations.py's whole objectives, per sample, on numbers worked out by hand (and their wrong twins)."""
    from iql_torchrl.objectives.equations import actor_objective, critic_objective, value_objective

    # V: diffs min Q̄ − V = [1, −2] → [0.7·1², 0.3·2²]; τ swapped would give [0.3, 2.8]
    loss = value_objective(torch.tensor([2.0, -1.0]), torch.tensor([1.0, 1.0]), 0.7)
    torch.testing.assert_close(loss, torch.tensor([0.7, 1.2]))
    assert not torch.allclose(loss, torch.tensor([0.3, 2.8]))
    # Q: two critics [[1, 2], [3, 0]] onto [2, 1]: squared errors [1, 1] and [1, 1], summed over critics (not averaged)
    loss = critic_objective(torch.tensor([[1.0, 2.0], [3.0, 0.0]]), torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(loss, torch.tensor([2.0, 2.0]))
    # π: A = [0.5, 0, 40] → weights [e^1.5, 1, 100 (clamped)] × objective [2, 3, 1]
    loss, weight, advantage = actor_objective(
        torch.tensor([1.0, 0.0, 40.0]), torch.tensor([0.5, 0.0, 0.0]), torch.tensor([2.0, 3.0, 1.0]), 3.0
    )
    torch.testing.assert_close(weight, torch.tensor([math.exp(1.5), 1.0, 100.0]))
    torch.testing.assert_close(loss, torch.tensor([2 * math.exp(1.5), 3.0, 100.0]))
    torch.testing.assert_close(advantage, torch.tensor([0.5, 0.0, 40.0]))


# ---------------------------------------------------------------------------- more of TorchRL's API
HAND_Q1, HAND_Q2 = torch.tensor([2.0, 1.0]), torch.tensor([1.5, 2.5])  # the hand critics on hand_batch()


def _hand_qvalue_loss(target):
    return (HAND_Q1 - target) ** 2 + (HAND_Q2 - target) ** 2


def test_a_td0_estimator_that_standardises_rewards_is_applied():
    loss = IQLLoss(*hand_networks(), reduction="none", scalar_output_mode="exclude")
    loss.make_value_estimator(ValueEstimators.TD0, gamma=0.5, average_rewards=True)
    # r = [1, 2] → (r − 1.5) / std = ∓1/√2 (std with Bessel's correction: 1/√2); V(s') = [2, −], 2nd terminated
    r = torch.tensor([-1.0, 1.0]) / math.sqrt(2)
    expected = _hand_qvalue_loss(torch.stack([r[0] + 0.5 * 2.0, r[1]]))
    got = loss(hand_batch())["loss_qvalue"]
    assert torch.allclose(got, expected, rtol=1e-5)
    assert (got - _hand_qvalue_loss(torch.tensor([1.0 + 0.5 * 2.0, 2.0]))).abs().max() > 0.5  # rewards as given


def test_a_users_own_td0_estimator_is_applied():
    from torchrl.objectives.value import TD0Estimator

    class TenfoldRewards(TD0Estimator):
        def value_estimate(self, tensordict, target_params=None, next_value=None, **kwargs):
            tensordict = tensordict.clone(False).set(("next", "reward"), 10 * tensordict["next", "reward"])
            return super().value_estimate(tensordict, target_params=target_params, next_value=next_value, **kwargs)

    loss = IQLLoss(*hand_networks(), reduction="none", scalar_output_mode="exclude")
    loss.make_value_estimator(TenfoldRewards, gamma=0.5, value_network=loss.value_network)
    got = loss(hand_batch())["loss_qvalue"]
    assert torch.allclose(got, _hand_qvalue_loss(torch.tensor([10.0 + 0.5 * 2.0, 20.0])), rtol=1e-5)


@pytest.mark.parametrize("estimator", ["TD0", "TD0 through TorchRL's code"])
def test_n_step_batches_discount_by_gamma_to_the_n(estimator):
    from torchrl.objectives.value import TD0Estimator

    class Own(TD0Estimator):  # any subclass takes TorchRL's own value_estimate
        pass

    loss = IQLLoss(*hand_networks(), reduction="none", scalar_output_mode="exclude")
    if estimator == "TD0":
        loss.make_value_estimator(ValueEstimators.TD0, gamma=0.5)
    else:
        loss.make_value_estimator(Own, gamma=0.5, value_network=loss.value_network)
    batch = hand_batch(terminated=(False, False)).set("steps_to_next_obs", torch.tensor([[3], [1]]))
    got = loss(batch)["loss_qvalue"]
    # V(s') = [2, 1]: target = r + 0.5^n·V(s') = [1 + 0.125·2, 2 + 0.5·1]
    assert torch.allclose(got, _hand_qvalue_loss(torch.tensor([1.25, 2.5])), rtol=1e-5)
    assert (got - _hand_qvalue_loss(torch.tensor([2.0, 2.5]))).abs().max() > 0.3  # γ¹ for every step count


def test_set_vmap_randomness_lets_critics_that_draw_noise_run():
    class NoisyCritic(nn.Module):  # noise from a functional call: no module TorchRL recognises as random
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(5, 1)

        def forward(self, observation, action):
            return self.net(torch.cat([observation, action], -1)) + 0.1 * torch.randn(*observation.shape[:-1], 1)

    torch.manual_seed(0)
    actor, _, value = make_iql_networks(3, 2, hidden_sizes=(8,))
    critic = TensorDictModule(NoisyCritic(), ["observation", "action"], ["state_action_value"])
    loss = IQLLoss(actor, critic, value)
    with pytest.raises(RuntimeError, match="randomness"):
        loss(random_batch())
    loss.set_vmap_randomness("different")
    assert torch.isfinite(loss(random_batch())["loss_qvalue"])


def _torchrl_and_ours_with_one_critic():
    torch.manual_seed(0)
    actor, critics, value = make_iql_networks(3, 2, hidden_sizes=(8,))
    theirs = TorchRLIQLLoss(actor, critics[0], value, num_qvalue_nets=1, loss_function="l2",
                            temperature=3.0, expectile=0.7)
    torch.manual_seed(1)
    actor, critics, value = make_iql_networks(3, 2, hidden_sizes=(8,))
    ours = IQLLoss(actor, critics[0], value, num_qvalue_nets=1)
    return theirs, ours


def test_a_torchrl_checkpoint_with_one_critic_loads():
    theirs, ours = _torchrl_and_ours_with_one_critic()
    with torch.no_grad():
        theirs.target_qvalue_network_params.apply_(lambda p: p.mul_(0.5))
    batch = random_batch()
    assert not torch.allclose(theirs(batch.clone())["loss_value"], ours(batch.clone())["loss_value"])
    ours.load_state_dict(theirs.state_dict())
    a, b = theirs(batch.clone()), ours(batch.clone())
    for key in ("loss_value", "loss_qvalue"):  # the actor losses differ by design: TorchRL's V(s) is another call
        torch.testing.assert_close(a[key], b[key])
    theirs.load_state_dict(ours.state_dict())  # and back


def test_get_stateful_net_gives_the_one_critic_holding_the_losss_parameters_as_torchrl_does():
    for loss in _torchrl_and_ours_with_one_critic():
        critic = loss.get_stateful_net("qvalue_network")
        last = [m for m in critic.modules() if isinstance(m, nn.Linear)][-1]
        with torch.no_grad():  # initialising the stateful network initialises the loss's critic (TorchRL's use)
            last.bias.fill_(5.0)
        biases = [p for k, p in loss.qvalue_network_params.items(True, True) if k[-1] == "bias" and p.numel() == 1]
        assert [b.item() for b in biases] == [5.0], type(loss)
        assert critic(random_batch())["state_action_value"].shape == (16, 1)


@pytest.mark.parametrize("kind", ["numpy float", "numpy int", "0-d tensor"])
def test_numpy_and_tensor_hyperparameters_are_numbers(kind):
    import numpy as np

    make = {"numpy float": np.float32, "numpy int": np.int64, "0-d tensor": torch.tensor}[kind]
    temperature = make(3)
    loss = IQLLoss(*hand_networks(), expectile=0.7 if kind == "numpy int" else make(0.7), temperature=temperature)
    out = loss(hand_batch())
    assert out["loss_value"].item() == pytest.approx(0.2375, rel=1e-6)  # the hand numbers above
    assert loss.temperature == 3.0 and isinstance(loss.temperature, float)
    with pytest.raises(ValueError, match="temperature"):
        IQLLoss(*hand_networks(), temperature=torch.tensor([3.0, 1.0]))
    with pytest.raises(ValueError, match="temperature"):
        IQLLoss(*hand_networks(), temperature=True)


def test_networks_that_cast_their_inputs_take_float64_data():
    class Float32Inputs(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, *inputs):
            return self.net(*(x.float() for x in inputs))

    actor, critics, value = hand_networks()
    casting = IQLLoss(TensorDictModule(Float32Inputs(actor.module), ["observation"], ["action"]),
                      [TensorDictModule(Float32Inputs(c.module), c.in_keys, c.out_keys) for c in critics],
                      TensorDictModule(Float32Inputs(value.module), ["observation"], ["state_value"]))
    batch = hand_batch().apply(lambda x: x.double() if x.is_floating_point() else x)
    assert casting(batch)["loss_qvalue"].item() == pytest.approx(2.2004, rel=1e-6)
    # the same networks without the cast: the dtype error names the key and both dtypes
    with pytest.raises(TypeError, match=r"'observation' is torch.float64.*torch.float32"):
        IQLLoss(*hand_networks())(batch)


def test_a_sequence_ending_in_a_probabilistic_module_is_refused_not_trained_by_squared_error():
    from tensordict.nn import ProbabilisticTensorDictModule, TensorDictSequential
    from torch.distributions import Normal

    torch.manual_seed(0)
    _, critics, value = make_iql_networks(3, 2, hidden_sizes=(8,))
    head = TensorDictModule(GaussianPolicyHead(3, 2, hidden_sizes=(8,)), ["observation"], ["loc", "scale"])
    sampler = ProbabilisticTensorDictModule(["loc", "scale"], ["action"], distribution_class=Normal)
    with pytest.raises(TypeError, match="ProbabilisticTensorDictSequential"):
        IQLLoss(TensorDictSequential(head, sampler), critics, value)


def test_the_step_s_parameter_dicts_become_the_tensordict_its_constructor_builds():
    # the fused step hands the loss each network's leaves as a dict by nested key; the vmapped critics take them
    # as a TensorDict, built from nested dicts (fewer traced steps): it must be the one TensorDict(flat) builds
    torch.manual_seed(0)
    actor, critics, value = make_iql_networks(3, 2, hidden_sizes=(8,))
    params = IQLLoss(actor, critics, value).qvalue_network_params
    flat = {**dict(params.items(True, True)), "scale": torch.ones(2)}  # a key at the root too
    expected = TensorDict(flat, batch_size=params.batch_size)
    got = _nested_tensordict(flat, params.batch_size)
    assert set(got.keys(True, True)) == set(expected.keys(True, True))
    assert all(got.get(key) is expected.get(key) for key in expected.keys(True, True))  # the same tensors, no copies
    assert got.batch_size == expected.batch_size == torch.Size([2])
    assert got.get(("module", "net")).batch_size == torch.Size([2])
    dotted = TensorDict({".".join(k) if isinstance(k, tuple) else k: v for k, v in flat.items()}, batch_size=[2])
    assert set(got.keys(True, True)) != set(dotted.keys(True, True))  # nested, not flattened to names
