"""Every network a TorchRL user hands IQLLoss trains, in every composition and every driver.

The matrix: critics (a list; one module with N = 1 and N = 3; a module listed twice; TorchRL's
``MLP`` in a ``ValueOperator``; a custom ``nn.Module`` with ``forward(obs, act)``; a trunk shared with
the actor, ``separate_losses`` True and False) × actors (the paper's Gaussian, ``TanhNormal``,
TorchRL's deterministic ``Actor``, categorical and one-hot) × drivers (a TorchRL script's loop:
one Adam over ``loss.parameters()``, the summed losses' ``backward()``, ``SoftUpdate``; one optimizer
per loss key; ``IQLUpdate`` eager; ``IQLUpdate(mode="compile")`` on small cases).

Each cell asserts behaviour: after a few steps every critic entry, every actor and value parameter
has changed (and with one critic module, the module itself: it trains in place as in TorchRL),
each target entry moved toward its online twin by exactly τ (the blend worked out in float64 here),
and no loss sent gradient where it must not (the actor loss to V or the critics; the critic loss
to the actor's trunk under ``separate_losses=True``; the value loss to anything but V).

Mutations these tests kill (each tried by hand):
* the one-element-list path restored (``own_critic_parameters`` not called): 31 cells fail (every
  N = 1 cell of ``test_every_network_trains`` in every driver: critic entries unchanged and absent
  from ``loss.parameters()``; the trunk cells of ``test_no_loss_trains_what_it_must_not``; the N = 1
  rows of ``test_trainable_tensors_agree_with_torchrl``);
* IQLUpdate's target update copying instead of blending (τ → 1): every ``update_*`` cell fails
  ``_assert_soft_update``;
* the trunk not detached for the critics under ``separate_losses=True``: both ``trunk_separate``
  cells of ``test_no_loss_trains_what_it_must_not`` fail (the critic loss reaches the actor's trunk);
* ``[critic, critic]`` stacked as one critic twice: the two critics start (and stay) equal, which
  ``test_a_module_listed_twice_gives_independent_critics`` refuses.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torchrl.objectives
from tensordict import TensorDict
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn
from torch.distributions import Categorical
from torchrl.modules import MLP, Actor, OneHotCategorical, ProbabilisticActor, TanhNormal, ValueOperator
from torchrl.objectives import SoftUpdate

from iql_torchrl import DiscreteIQLLoss, IQLLoss, IQLUpdate
from iql_torchrl.objectives.networks import make_actor

OBS, ACT, N_ACTIONS, HIDDEN, BATCH, STEPS, TAU, LR = 3, 2, 4, 16, 32, 3, 0.005, 1e-2


# ------------------------------------------------------------------------------ the user's modules
class PairCritic(nn.Module):
    """A critic the TorchRL way: its own forward(observation, action)."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(OBS + ACT, HIDDEN)
        self.out = nn.Linear(HIDDEN, 1)

    def forward(self, observation, action):
        return self.out(torch.relu(self.hidden(torch.cat([observation, action], -1))))


class TrunkCritic(nn.Module):
    """Q(s, a) on a trunk that the actor also reads."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(HIDDEN + ACT, 1)

    def forward(self, observation, action):
        return self.head(torch.cat([self.trunk(observation), action], -1))


def mlp_critic():
    return ValueOperator(MLP(in_features=OBS + ACT, out_features=1, num_cells=[HIDDEN]), in_keys=["observation", "action"])


def value_net():
    return ValueOperator(MLP(in_features=OBS, out_features=1, num_cells=[HIDDEN]), in_keys=["observation"])


def tanh_normal_actor(trunk: nn.Module | None = None):
    body = [trunk, nn.Linear(HIDDEN, 2 * ACT)] if trunk is not None else [MLP(in_features=OBS, out_features=2 * ACT, num_cells=[HIDDEN])]
    module = TensorDictModule(nn.Sequential(*body, NormalParamExtractor()), ["observation"], ["loc", "scale"])
    return ProbabilisticActor(module, in_keys=["loc", "scale"], distribution_class=TanhNormal)


def discrete_actor(one_hot: bool):
    module = TensorDictModule(MLP(in_features=OBS, out_features=N_ACTIONS, num_cells=[HIDDEN]), ["observation"], ["logits"])
    return ProbabilisticActor(module, in_keys=["logits"], distribution_class=OneHotCategorical if one_hot else Categorical)


def discrete_critic():
    return ValueOperator(MLP(in_features=OBS, out_features=N_ACTIONS, num_cells=[HIDDEN]), in_keys=["observation"],
                         out_keys=["state_action_value"])


# (name, builder) -> (actor, critics as handed to the loss, value, loss kwargs, discrete action space or None)
def build(critics: str, actor: str):
    torch.manual_seed(0)
    kwargs, space = {}, None
    if actor in ("categorical", "one_hot"):
        space = actor.replace("_", "-")
        act = discrete_actor(actor == "one_hot")
        critic = [discrete_critic(), discrete_critic()] if critics == "list" else discrete_critic()
        kwargs["num_qvalue_nets"] = 2 if critics == "list" else 1
        return act, critic, value_net(), kwargs, space
    trunk = nn.Sequential(nn.Linear(OBS, HIDDEN), nn.ReLU())
    act = {
        "gaussian": lambda: make_actor(OBS, ACT, hidden_sizes=(HIDDEN,)),
        "tanh_normal": lambda: tanh_normal_actor(trunk if critics.startswith("trunk") else None),
        "deterministic": lambda: Actor(MLP(in_features=OBS, out_features=ACT, num_cells=[HIDDEN]), in_keys=["observation"]),
    }[actor]()
    if critics == "list":
        critic, kwargs["num_qvalue_nets"] = [mlp_critic(), mlp_critic()], 2
    elif critics == "one_n1":
        critic, kwargs["num_qvalue_nets"] = mlp_critic(), 1
    elif critics == "one_n3":
        critic, kwargs["num_qvalue_nets"] = mlp_critic(), 3
    elif critics == "repeated":
        one = mlp_critic()
        critic, kwargs["num_qvalue_nets"] = [one, one], 2
    elif critics == "custom":
        critic = TensorDictModule(PairCritic(), ["observation", "action"], ["state_action_value"])
        kwargs["num_qvalue_nets"] = 1
    elif critics.startswith("trunk"):
        critic = TensorDictModule(TrunkCritic(trunk), ["observation", "action"], ["state_action_value"])
        kwargs["num_qvalue_nets"] = 1 if critics.endswith("n1") else 2
        kwargs["separate_losses"] = "separate" in critics
    return act, critic, value_net(), kwargs, space


def make_loss(critics: str, actor: str):
    act, critic, value, kwargs, space = build(critics, actor)
    if space is not None:
        return DiscreteIQLLoss(act, critic, value, action_space=space, **kwargs), (act, critic, value)
    return IQLLoss(act, critic, value, **kwargs), (act, critic, value)


def batch_for(actor: str, seed: int = 0) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    if actor == "categorical":
        action = torch.randint(N_ACTIONS, (BATCH,), generator=g)
    elif actor == "one_hot":
        action = nn.functional.one_hot(torch.randint(N_ACTIONS, (BATCH,), generator=g), N_ACTIONS).float()
    else:
        action = torch.rand(BATCH, ACT, generator=g) * 1.8 - 0.9
    return TensorDict({
        "observation": torch.randn(BATCH, OBS, generator=g), "action": action,
        ("next", "observation"): torch.randn(BATCH, OBS, generator=g),
        ("next", "reward"): torch.randn(BATCH, 1, generator=g),
        ("next", "done"): torch.zeros(BATCH, 1, dtype=torch.bool),
        ("next", "terminated"): torch.rand(BATCH, 1, generator=g) < 0.2,
    }, [BATCH])


# --------------------------------------------------------------------------------------- drivers
def script_loop(loss, batch):
    """A TorchRL script: one Adam over loss.parameters(), the summed losses' backward, SoftUpdate."""
    optimizer = torch.optim.Adam(loss.parameters(), lr=LR)
    updater = SoftUpdate(loss, tau=TAU)
    for _ in range(STEPS):
        out = loss(batch.clone())
        (out["loss_value"] + out["loss_actor"] + out["loss_qvalue"]).backward()
        optimizer.step()
        optimizer.zero_grad()
        yield lambda: updater.step()


def per_key_loop(loss, batch):
    """One optimizer per loss key, each loss's own backward, then SoftUpdate."""
    optimizers = {
        name: torch.optim.Adam(list(getattr(loss, f"{net}_network_params").parameters()), lr=LR)
        for name, net in (("loss_actor", "actor"), ("loss_value", "value"), ("loss_qvalue", "qvalue"))
    }
    updater = SoftUpdate(loss, tau=TAU)
    for _ in range(STEPS):
        out = loss(batch.clone())
        for name, optimizer in optimizers.items():
            optimizer.zero_grad()
            out[name].backward(retain_graph=True)
            optimizer.step()
        yield lambda: updater.step()


def update_loop(mode):
    def loop(loss, batch):
        update = IQLUpdate(loss, lr=LR, tau=TAU, mode=mode)
        for _ in range(STEPS):
            # IQLUpdate steps the optimizers AND blends the targets in one call: hand it over as the "update"
            yield lambda: update(batch.clone())
    return loop


DRIVERS = {"script": script_loop, "per_key": per_key_loop, "update_eager": update_loop("eager"),
           "update_compile": update_loop("compile")}


def run_driver(driver: str, loss, batch):
    """Runs the driver; returns, for its last step, target before, online after, target after (float64)."""
    targets = lambda: {k: v.detach().double().clone() for k, v in loss.target_qvalue_network_params.items(True, True)}
    online = lambda: {k: v.detach().double().clone() for k, v in loss.qvalue_network_params.items(True, True)}
    record = None
    for finish_step in DRIVERS[driver](loss, batch):
        before = targets()
        finish_step()  # the script's SoftUpdate after its optimizers, or one whole IQLUpdate step
        record = (before, online(), targets())
    return record


# ----------------------------------------------------------------------------------------- checks
def snapshot(loss, modules):
    return {
        "loss": {name: {k: v.detach().clone() for k, v in getattr(loss, f"{name}_network_params").items(True, True)}
                 for name in ("actor", "value", "qvalue")},
        "critic_module": {k: v.detach().clone() for k, v in _critic_module(modules).named_parameters()},
    }


def _critic_module(modules):
    critic = modules[1]
    return critic[0] if isinstance(critic, list) else critic


def _assert_every_entry_changed(loss, before, critics: str, num_critics: int):
    for name in ("actor", "value", "qvalue"):
        for key, old in before["loss"][name].items():
            new = getattr(loss, f"{name}_network_params").get(key)
            if name == "qvalue":  # each critic's slice on its own: none may be frozen
                for i in range(num_critics):
                    assert not torch.equal(new[i], old[i]), f"critic {i}'s {key} never changed"
            else:
                assert not torch.equal(new, old), f"the {name}'s {key} never changed"


def _assert_soft_update(record, frozen=()):
    """target_after = target_before + τ·(online_after − target_before), worked out here in float64.

    ``frozen``: entries TorchRL's SoftUpdate leaves where they are (it blends only entries that require
    grad, and the actor's trunk that the critics read under separate_losses=True does not).
    """
    before, online, after = record
    for key, target in after.items():
        if key in frozen:
            assert torch.equal(target, before[key])
            continue
        expected = before[key] + TAU * (online[key] - before[key])
        torch.testing.assert_close(target, expected, rtol=1e-5, atol=1e-7, msg=f"target {key} is not the τ-blend")
        # the plausible wrong variants: a copy (τ = 1) and no update at all
        assert not torch.allclose(target, online[key], rtol=0, atol=1e-7), f"target {key} was copied"
        assert not torch.equal(target, before[key]), f"target {key} did not move"


CONTINUOUS_CRITICS = ["list", "one_n1", "one_n3", "repeated", "custom", "trunk_separate_n1", "trunk_joint_n1",
                      "trunk_separate_n2", "trunk_joint_n2"]
CELLS = (
    [(critics, "gaussian" if not critics.startswith("trunk") else "tanh_normal") for critics in CONTINUOUS_CRITICS]
    + [("one_n1", actor) for actor in ("tanh_normal", "deterministic", "categorical", "one_hot")]
    + [("list", actor) for actor in ("categorical", "one_hot")]
)
COMPILED_CELLS = [("one_n1", "gaussian"), ("trunk_separate_n1", "tanh_normal"), ("one_n1", "deterministic"),
                  ("one_n1", "categorical")]
MATRIX = [(c, a, d) for c, a in CELLS for d in ("script", "per_key", "update_eager")] + [
    pytest.param(c, a, "update_compile", marks=pytest.mark.slow, id=f"{c}-{a}-update_compile") for c, a in COMPILED_CELLS]


@pytest.mark.parametrize("critics,actor,driver", MATRIX, ids=lambda value: value)
def test_every_network_trains(critics, actor, driver):
    loss, modules = make_loss(critics, actor)
    num_critics = loss.num_qvalue_nets
    before = snapshot(loss, modules)
    record = run_driver(driver, loss, batch_for(actor))
    _assert_every_entry_changed(loss, before, critics, num_critics)
    detached = {k for k, v in loss.qvalue_network_params.items(True, True) if not v.requires_grad}
    # IQLUpdate blends every entry the critics read, the shared trunk included; SoftUpdate skips it
    _assert_soft_update(record, frozen=() if driver.startswith("update") else detached)
    if num_critics == 1 and not critics.startswith("trunk_joint"):
        # one critic module trains in place, as in TorchRL (the loss's [1, …] entries view its tensors)
        for key, old in before["critic_module"].items():
            new = dict(_critic_module(modules).named_parameters())[key]
            assert not torch.equal(new, old), f"the critic module's own {key} never changed"


def _grads(loss_value, params: dict):
    grads = torch.autograd.grad(loss_value, list(params.values()), allow_unused=True, retain_graph=True)
    return {name: g for name, g in zip(params, grads)}


@pytest.mark.parametrize("critics,actor", CELLS, ids=["-".join(cell) for cell in CELLS])
def test_no_loss_trains_what_it_must_not(critics, actor):
    """Each loss reaches only its own network: the actor loss neither V nor the critics, the value loss
    only V, the critic loss only the critics (under separate_losses=True not the trunk it shares)."""
    loss, _ = make_loss(critics, actor)
    groups = {name: dict(getattr(loss, f"{name}_network_params").items(True, True)) for name in ("actor", "value", "qvalue")}
    trainable = {(name, key): p for name, params in groups.items() for key, p in params.items() if p.requires_grad}
    out = loss(batch_for(actor))
    owner = {"loss_actor": "actor", "loss_value": "value", "loss_qvalue": "qvalue"}
    for loss_key, own in owner.items():
        grads = _grads(out[loss_key], trainable)
        for (name, key), grad in grads.items():
            reached = grad is not None and bool(grad.abs().sum() > 0)
            if name != own:
                assert not reached, f"{loss_key} sent gradient to the {name}'s {key}"
        assert any(g is not None and bool(g.abs().sum() > 0) for (name, _), g in grads.items() if name == own)
    if critics.startswith("trunk_separate"):
        # the trunk is the actor's: the critics read it, without gradient and without a copy of their own
        trunk_weight = loss.actor_network_params.get(("module", "0", "module", "0", "0", "weight"))
        critic_trunk = loss.qvalue_network_params.get(("module", "trunk", "0", "weight"))
        assert not critic_trunk.requires_grad and critic_trunk[0].data_ptr() == trunk_weight.data_ptr()


@pytest.mark.parametrize("critics", ["one_n1", "list", "one_n3", "custom", "trunk_separate_n1", "trunk_joint_n1"])
def test_trainable_tensors_agree_with_torchrl(critics):
    """loss.parameters() holds as many trainable tensors as torchrl.objectives.IQLLoss built from the
    same modules, with the same shapes, except where the two deliberately differ:
    * N = 1: every critic tensor carries a leading ensemble dim of 1 here ([1, …]), not in TorchRL;
    * a trunk shared with the actor under separate_losses=False, N = 1: TorchRL trains one trunk with
      both losses; here the critic trains a trunk of its own, started from the actor's (each network
      has its own optimizer group in the fused step), so one more set of trunk tensors."""
    actor = "tanh_normal" if critics.startswith("trunk") else "gaussian"
    ours, modules = make_loss(critics, actor)
    act, critic, value, kwargs, _ = build(critics, actor)
    theirs = torchrl.objectives.IQLLoss(act, critic, value, **kwargs)
    our_shapes = sorted(tuple(p.shape) for p in ours.parameters() if p.requires_grad)
    their_shapes = [tuple(p.shape) for p in theirs.parameters() if p.requires_grad]
    assert len(our_shapes) > 0 and len(their_shapes) > 0
    if kwargs["num_qvalue_nets"] == 1:
        others = {id(p) for p in [*act.parameters(), *value.parameters()]}
        critic_only = [p for p in theirs.qvalue_network_params.values(True, True)
                       if isinstance(p, nn.Parameter) and id(p) not in others]
        for p in critic_only:  # deliberate: [1, …] here
            their_shapes.remove(tuple(p.shape))
            their_shapes.append((1, *p.shape))
    if critics == "trunk_joint_n1":  # deliberate: the critic's own trunk
        their_shapes += [(1, *p.shape) for p in modules[1].module.trunk.parameters()]
    assert our_shapes == sorted(their_shapes)


def test_a_module_listed_twice_gives_independent_critics():
    loss, (_, critic, _) = make_loss("repeated", "gaussian")
    weights = loss.qvalue_network_params.get(("module", "0", "weight"))
    assert not torch.equal(weights[0], weights[1])  # the second is a re-initialised copy, not the same critic twice
    torch.testing.assert_close(weights[0], critic[0].module[0].weight)  # the first keeps the given weights


@pytest.mark.parametrize("critics", ["one_n1", "custom"])
def test_one_critic_module_lives_in_the_state_dict(critics):
    """A checkpoint of the loss holds the single critic: a fresh loss loaded from it scores the same Q."""
    loss, _ = make_loss(critics, "gaussian")
    batch = batch_for("gaussian")
    run_driver("script", loss, batch)
    state = copy.deepcopy(loss.state_dict())
    assert any(k.startswith("qvalue_network_params") for k in state)
    fresh, _ = make_loss(critics, "gaussian")
    before = fresh(batch.clone())["loss_qvalue"]
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(batch.clone())["loss_qvalue"], loss(batch.clone())["loss_qvalue"])
    assert not torch.equal(before, fresh(batch.clone())["loss_qvalue"])


class HeadOnSharedTrunk(nn.Module):
    """Q(s, a) = head(trunk(s, a)), the trunk one module that every critic of the list holds."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, observation, action):
        return self.head(self.trunk(torch.cat([observation, action], -1)))


def test_critics_sharing_a_trunk_each_train_a_trunk_of_their_own():
    """Two critics in a list holding one trunk: each critic trains a copy of its own, started from the
    shared weights (TorchRL stacks the shared trunk as an expanded view, which its loop never trains)."""
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(OBS + ACT, HIDDEN), nn.ReLU())
    critics = [TensorDictModule(HeadOnSharedTrunk(trunk), ["observation", "action"], ["state_action_value"])
               for _ in range(2)]
    loss = IQLLoss(make_actor(OBS, ACT, hidden_sizes=(HIDDEN,)), critics, value_net())
    start = trunk[0].weight.detach().clone()
    for finish_step in script_loop(loss, batch_for("gaussian")):
        finish_step()
    trained = loss.qvalue_network_params.get(("module", "trunk", "0", "weight")).detach()
    assert not torch.equal(trained[0], start) and not torch.equal(trained[1], start)
    assert not torch.equal(trained[0], trained[1])  # two trunks, each moved by its own critic's head
