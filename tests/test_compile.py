"""torch.compile(IQLLoss) gives eager's values and gradients, in one graph (fullgraph=True)."""
import pytest
import torch
from tensordict import TensorDict

from iql_torchrl import DiscreteIQLLoss, IQLLoss, make_iql_networks


def _batch(action):
    b = action.shape[0]
    return TensorDict(
        {
            "observation": torch.randn(b, 3),
            "action": action,
            ("next", "observation"): torch.randn(b, 3),
            ("next", "reward"): torch.randn(b, 1),
            ("next", "terminated"): torch.rand(b, 1) < 0.2,
            ("next", "done"): torch.rand(b, 1) < 0.3,
        },
        [b],
    )


@pytest.mark.parametrize("actor_kind", ["gaussian", "categorical"])
def test_compiled_loss_matches_eager_in_one_graph(actor_kind):
    torch.manual_seed(0)
    discrete = actor_kind == "categorical"
    actor, critics, value = make_iql_networks(3, 4 if discrete else 2, actor_kind=actor_kind, hidden_sizes=(16,))
    if discrete:
        loss = DiscreteIQLLoss(actor, critics, value, action_space="categorical")
        batch = _batch(torch.randint(0, 4, (32, 1)))
    else:
        loss = IQLLoss(actor, critics, value)
        batch = _batch(torch.rand(32, 2) * 2 - 1)
    compiled = torch.compile(loss, fullgraph=True)  # any graph break raises

    def run(fn):
        loss.zero_grad(set_to_none=True)
        out = fn(batch.clone())
        (out["loss_value"] + out["loss_qvalue"] + out["loss_actor"]).backward()
        return out, [p.grad.clone() for p in loss.parameters()]

    (eager, eager_grads), (comp, comp_grads) = run(loss), run(compiled)
    for key in eager.keys():
        assert torch.allclose(eager[key].float(), comp[key].float(), rtol=1e-5, atol=1e-6), key
    for a, b in zip(eager_grads, comp_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
