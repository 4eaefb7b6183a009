"""Plain MLPs evaluated from their parameters give what their modules give, and only they are recognised.

The reference is each network called on its own, through its own module, in float64: the
stacked critics as K separate calls, not as the batched matmul under test. Critics are perturbed
apart first, so a stacked evaluation that read one critic's weights for both would be caught.
"""
import warnings

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.modules import MLP, ValueOperator

from iql_torchrl import DiscreteIQLLoss, IQLLoss, make_iql_networks
from iql_torchrl.objectives.networks import make_qvalue_networks, make_value_network, mlp
from iql_torchrl.objectives.plain_mlp import PlainMLP

warnings.filterwarnings("ignore", message="No target network updater")


def batch(shape=(5,), obs_dim=3, action_dim=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDict(
        {"observation": torch.randn(*shape, obs_dim, generator=g, dtype=torch.float64),
         "action": torch.rand(*shape, action_dim, generator=g, dtype=torch.float64) * 2 - 1},
        batch_size=shape,
    )


def separate_calls(critics, td, key="state_action_value"):
    """Each critic through its own module, one after the other: [K, *B, out]."""
    return torch.stack([critic(td.clone())[key] for critic in critics])


def stacked_params(critics):
    return TensorDict.from_modules(*critics, as_module=False).detach()


@pytest.mark.parametrize("shape", [(5,), (4, 3), ()])
def test_stacked_critics_equal_each_critic_called_alone(shape):
    torch.manual_seed(0)
    critics = [c.double() for c in make_qvalue_networks(3, 2, num_nets=3, hidden_sizes=(8, 8))]
    with torch.no_grad():  # apart everywhere, the output bias included
        for i, critic in enumerate(critics):
            for p in critic.parameters():
                p.add_(0.1 * (i + 1) * torch.randn_like(p))
    td = batch(shape)
    plain = PlainMLP.from_module(critics[0])
    got = plain(stacked_params(critics), td)
    expected = separate_calls(critics, td)
    assert got.shape == (3, *shape, 1)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # the wrong variant: every critic with the first critic's weights
    first_only = separate_calls([critics[0]] * 3, td)
    assert (got - first_only).abs().max() > 1e-3


@pytest.mark.parametrize("activations", [(nn.ReLU,), (nn.ReLU, nn.ReLU), (nn.Tanh,), (nn.ReLU, nn.Tanh)],
                         ids=["relu", "relu_relu", "tanh", "relu_tanh"])
@pytest.mark.parametrize("num_nets", [1, 2], ids=["single", "stacked"])
def test_gradients_through_the_plain_path_equal_the_modules(activations, num_nets):
    # the eager plain path overwrites GEMM outputs in place with a ReLU: a second activation on top,
    # or a wrong in-place write, would corrupt the gradients autograd computes from saved tensors
    torch.manual_seed(1)
    nets = [TensorDictModule(nn.Sequential(nn.Linear(3, 8), *(a() for a in activations), nn.Linear(8, 8),
                                           *(a() for a in activations), nn.Linear(8, 1)),
                             in_keys=["observation"], out_keys=["out"]).double() for _ in range(num_nets)]
    td = batch((6,))
    params = TensorDict.from_modules(*nets, as_module=False) if num_nets > 1 else TensorDict.from_module(nets[0])
    params = params.detach().clone().requires_grad_(True)
    got = PlainMLP.from_module(nets[0])(params, td)
    if num_nets == 1:
        got = got.unsqueeze(0)
    (got * torch.arange(1.0, 7.0, dtype=torch.float64).unsqueeze(-1)).sum().backward()  # rows weighted apart
    for k, net in enumerate(nets):
        out = net(td.clone())["out"]
        torch.testing.assert_close(got[k].detach(), out.detach(), rtol=1e-12, atol=1e-12)
        (out * torch.arange(1.0, 7.0, dtype=torch.float64).unsqueeze(-1)).sum().backward()
        for (key, p), grad in zip(net.named_parameters(), (params.grad[k] if num_nets > 1 else params.grad).values(True, True)):
            torch.testing.assert_close(grad, p.grad, rtol=1e-10, atol=1e-12, msg=key)
    assert all(g.abs().sum() > 0 for g in params.grad.values(True, True))  # every gradient compared is nonzero


def test_under_bf16_autocast_the_compiled_plain_path_keeps_eager_s_dtypes_and_values():
    # eager uses baddbmm, compiled bmm + bias: under autocast both must stay in bfloat16 like the
    # critics' own Linear layers (a float32 bias added to a bf16 product would promote to float32)
    torch.manual_seed(0)
    critics = make_qvalue_networks(3, 2, num_nets=2, hidden_sizes=(16, 16))
    params, td = stacked_params(critics), batch((8,)).float()
    plain = PlainMLP.from_module(critics[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = plain(params, td)
        compiled = torch.compile(plain.__call__, fullgraph=True)(params, td)
        modules = separate_calls(critics, td)
    assert eager.dtype == compiled.dtype == modules.dtype == torch.bfloat16
    torch.testing.assert_close(compiled.float(), eager.float(), rtol=2e-2, atol=2e-2)


def test_torchrl_mlp_critic_and_single_network():
    torch.manual_seed(1)
    critics = [
        ValueOperator(MLP(in_features=5, out_features=1, num_cells=[7, 6], activation_class=nn.Tanh,
                          activate_last_layer=True), in_keys=["observation", "action"]).double()
        for _ in range(2)
    ]
    td = batch((4,))
    plain = PlainMLP.from_module(critics[0])
    assert plain is not None
    torch.testing.assert_close(plain(stacked_params(critics), td), separate_calls(critics, td), rtol=1e-12, atol=1e-12)
    # one network, unstacked parameters: F.linear per layer
    value = make_value_network(3, hidden_sizes=(8,)).double()
    params = TensorDict.from_module(value, as_module=False).detach()
    torch.testing.assert_close(PlainMLP.from_module(value)(params, td), value(td.clone())["state_value"])


def test_discrete_critics_read_the_observation_only():
    torch.manual_seed(2)
    critics = [c.double() for c in make_qvalue_networks(3, 4, num_nets=2, hidden_sizes=(8,), discrete=True)]
    td = batch((6,))
    got = PlainMLP.from_module(critics[0])(stacked_params(critics), td)
    assert got.shape == (2, 6, 4)
    torch.testing.assert_close(got, separate_calls(critics, td), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "module",
    [
        mlp(3, 1, (8,), layer_norm=True),
        mlp(3, 1, (8,), dropout=0.1),
        nn.Sequential(nn.Linear(3, 8, bias=False), nn.ReLU(), nn.Linear(8, 1)),
        nn.Sequential(nn.ReLU(), nn.Linear(3, 1)),
        MLP(in_features=3, out_features=(2, 2), num_cells=[8]),
    ],
    ids=["layer_norm", "dropout", "no_bias", "activation_first", "reshaped_output"],
)
def test_anything_but_a_plain_mlp_keeps_the_module_path(module):
    assert PlainMLP.from_module(TensorDictModule(module, in_keys=["observation"], out_keys=["out"])) is None


def test_loss_uses_the_plain_path_for_the_default_networks_and_the_module_path_otherwise():
    loss = IQLLoss(*make_iql_networks(3, 2, hidden_sizes=(8,)))
    assert loss.plain_qvalue is not None and loss.plain_value is not None
    actor, critics, _ = make_iql_networks(3, 2, hidden_sizes=(8,))
    value = ValueOperator(mlp(3, 1, (8,), layer_norm=True), in_keys=["observation"])
    loss = IQLLoss(actor, critics, value, deactivate_vmap=True)
    assert loss.plain_qvalue is None and loss.plain_value is None


@pytest.mark.parametrize("loss_cls,actor_kind", [(IQLLoss, "gaussian"), (DiscreteIQLLoss, "categorical")])
def test_plain_and_module_paths_give_the_same_losses_and_gradients(loss_cls, actor_kind):
    """The same loss with the plain path switched off: TorchRL's vmapped module calls."""
    torch.manual_seed(3)
    networks = make_iql_networks(3, 4 if actor_kind == "categorical" else 2, actor_kind=actor_kind, hidden_sizes=(8,))
    loss = loss_cls(*networks, **({"action_space": "categorical"} if actor_kind == "categorical" else {}))
    with torch.no_grad():  # target critics apart from the online ones
        for p in loss.target_qvalue_network_params.values(True, True):
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(4)
    td = TensorDict(
        {"observation": torch.randn(16, 3, generator=g),
         "action": torch.randint(0, 4, (16,), generator=g) if actor_kind == "categorical"
         else torch.rand(16, 2, generator=g) * 2 - 1,
         ("next", "observation"): torch.randn(16, 3, generator=g),
         ("next", "reward"): torch.randn(16, 1, generator=g),
         ("next", "done"): torch.zeros(16, 1, dtype=torch.bool),
         ("next", "terminated"): torch.zeros(16, 1, dtype=torch.bool)},
        batch_size=[16],
    )

    def losses_and_grads():
        loss.zero_grad()
        out = loss(td.clone())
        (out["loss_value"] + out["loss_actor"] + out["loss_qvalue"]).backward()
        return out, {k: p.grad.clone() for k, p in loss.named_parameters() if p.grad is not None}

    plain_out, plain_grads = losses_and_grads()
    loss.plain_qvalue = loss.plain_value = None
    module_out, module_grads = losses_and_grads()
    for key in ("loss_value", "loss_actor", "loss_qvalue"):
        torch.testing.assert_close(plain_out[key], module_out[key], rtol=1e-6, atol=1e-7)
    assert plain_grads.keys() == module_grads.keys() and len(plain_grads) > 0
    for key in plain_grads:
        torch.testing.assert_close(plain_grads[key], module_grads[key], rtol=1e-5, atol=1e-6)


def test_a_hook_registered_after_construction_is_honoured():
    loss = IQLLoss(*make_iql_networks(3, 2, hidden_sizes=(8,)))
    td = batch((4,), seed=5).float()
    before = loss._state_value(td)
    first = next(m for m in loss.value_network.modules() if isinstance(m, nn.Linear))
    first.register_forward_hook(lambda module, args, out: out * 0)  # V becomes the last bias alone
    after = loss._state_value(td)
    last_bias = loss.value_network_params["module", "2", "bias"].detach()
    torch.testing.assert_close(after.detach(), last_bias.expand(4))
    assert not torch.allclose(before, after)
