"""Whole update steps against the independent float64 implementation in ``reference.py``.

Only public API is used: ``IQLUpdate(loss, ...)`` called on batches, then the loss's parameters.
Each check also runs the named wrong variant of the reference and asserts that it lands farther
from the library than the tolerance, so a test cannot pass for both.
"""
import pytest
import torch
from reference import VARIANTS, ReferenceIQL, max_abs_diff
from synthetic import random_transitions

from iql_torchrl import IQLLoss, make_iql_networks
from iql_torchrl.step.update import IQLUpdate

OBS, ACT, B = 3, 2, 64
# float32 against float64 after 3 Adam steps: the largest parameter difference seen is 1.3e-7
# (eager); the nearest wrong variant lands 2.7e-4 away. 1e-5 leaves room for compiled kernels'
# reassociation and still sits 27x below it (each variant must differ by more than 10x this).
PARAM_TOL = 1e-5
NETWORKS = {  # reference attribute -> the loss's parameters
    "actor": "actor_network_params",
    "critics": "qvalue_network_params",
    "targets": "target_qvalue_network_params",
    "value": "value_network_params",
}
PAPER_VARIANTS = sorted(VARIANTS)
SUMMED_VARIANTS = sorted(set(VARIANTS) - {"stale_value_for_actor", "stale_value_for_critic"})


def perturbed_loss(seed, hidden=(8, 8)):
    """The default networks, with the target critics moved off the online ones and a log-std
    component outside the clip range, so that reading the wrong critics or skipping the clip shows."""
    torch.manual_seed(seed)
    loss = IQLLoss(*make_iql_networks(OBS, ACT, hidden_sizes=hidden))
    with torch.no_grad():
        loss.target_qvalue_network_params.apply_(lambda p: p.add_(0.05 * torch.randn_like(p)))
        log_std = next(v for k, v in loss.actor_network_params.items(True, True) if k[-1] == "log_std")
        log_std.copy_(torch.tensor([2.5, -0.5]))
    return loss


def distances(reference: ReferenceIQL, loss) -> dict[str, float]:
    return {name: max_abs_diff(getattr(reference, name), getattr(loss, params)) for name, params in NETWORKS.items()}


def run_steps(order, variants, seed=0, steps=3, lr=1e-2, tau=0.1, total_steps=4, mode="eager"):
    """The library's update and one reference per variant (None: the right one) over the same batches."""
    loss = perturbed_loss(seed)
    references = {v: ReferenceIQL.from_loss(loss, lr=lr, tau=tau, total_steps=total_steps, order=order, variant=v)
                  for v in (None, *variants)}
    update = IQLUpdate(loss, total_steps=total_steps, lr=lr, tau=tau, order=order, mode=mode)
    data = random_transitions(B * steps, OBS, ACT, seed)
    for k in range(steps):
        batch = data[k * B:(k + 1) * B]
        metrics = update(batch.clone())
        seen = {v: reference.step(batch) for v, reference in references.items()}
    return loss, references, metrics, seen


@pytest.mark.parametrize(
    "order, variants, mode",
    [("paper", PAPER_VARIANTS, "eager"), ("summed", SUMMED_VARIANTS, "eager"),
     pytest.param("paper", PAPER_VARIANTS, "compile", marks=pytest.mark.slow)],
)
def test_three_updates_match_the_float64_reference_and_no_wrong_variant(order, variants, mode):
    # lr 1e-2 and τ_soft 0.1 make one step move the networks far enough to tell the variants
    # apart; total_steps=4 puts the actor's cosine at 1, 0.854, 0.5 over the three steps.
    # The compiled step (one graph, torch.func gradients) is held to the same reference.
    loss, references, metrics, seen = run_steps(order, variants, mode=mode)
    right = distances(references[None], loss)
    assert max(right.values()) < PARAM_TOL, right
    assert float(metrics["loss_actor"]) == pytest.approx(seen[None]["loss_actor"], rel=1e-5)
    assert float(metrics["loss_qvalue"]) == pytest.approx(seen[None]["loss_qvalue"], rel=1e-5)
    for variant in variants:
        wrong = distances(references[variant], loss)
        assert max(wrong.values()) > 10 * PARAM_TOL, (variant, VARIANTS[variant], wrong)


def test_the_paper_order_actor_and_critics_see_the_new_value_network():
    # the losses the step reports: actor and Q with V after its Adam step; the stale-V variants
    # report different numbers, by far more than float32 rounding
    loss, references, metrics, seen = run_steps("paper", ["stale_value_for_actor", "stale_value_for_critic"], steps=1)
    assert float(metrics["loss_actor"]) == pytest.approx(seen[None]["loss_actor"], rel=1e-5)
    assert float(metrics["loss_qvalue"]) == pytest.approx(seen[None]["loss_qvalue"], rel=1e-5)
    assert seen["stale_value_for_actor"]["loss_actor"] != pytest.approx(seen[None]["loss_actor"], rel=1e-2)
    assert seen["stale_value_for_critic"]["loss_qvalue"] != pytest.approx(seen[None]["loss_qvalue"], rel=1e-2)


def test_the_defaults_are_the_papers_adam_rate_and_soft_target_rate():
    # IQLUpdate(loss, total_steps=...) with nothing else: lr 3e-4, τ_soft 0.005, cosine actor LR
    loss = perturbed_loss(1)
    reference = ReferenceIQL.from_loss(loss, total_steps=4)
    update = IQLUpdate(loss, total_steps=4)
    data = random_transitions(2 * B, OBS, ACT, 1)
    for k in range(2):
        update(data[k * B:(k + 1) * B].clone())
        reference.step(data[k * B:(k + 1) * B])
    right = distances(reference, loss)
    assert max(right.values()) < PARAM_TOL, right


@pytest.mark.filterwarnings("ignore:IQLUpdate.precision='bf16'.. the eager step runs slower")
def test_bf16_gemms_keep_loss_actor_within_two_percent_of_float64():
    # bf16 keeps ~3 significant digits: over 3 steps loss_actor stays well within 2% of the float64
    # reference (64-wide networks: the 64×64 hidden layers compute in bf16); the stale-V bug moves it by 25% or more.
    rel_tol = 2e-2
    lr = 1e-2
    torch.manual_seed(2)
    loss = IQLLoss(*make_iql_networks(OBS, ACT, hidden_sizes=(64, 64)))
    reference = ReferenceIQL.from_loss(loss, lr=lr, tau=0.1, total_steps=4)
    stale = ReferenceIQL.from_loss(loss, lr=lr, tau=0.1, total_steps=4, variant="stale_value_for_actor")
    update = IQLUpdate(loss, total_steps=4, lr=lr, tau=0.1, precision="bf16")
    data = random_transitions(3 * B, OBS, ACT, 2)
    for k in range(3):
        batch = data[k * B:(k + 1) * B]
        got = float(update(batch.clone())["loss_actor"])
        expected = reference.step(batch)["loss_actor"]
        wrong = stale.step(batch)["loss_actor"]
        assert got == pytest.approx(expected, rel=rel_tol), k
        assert wrong != pytest.approx(expected, rel=2 * rel_tol), k
    assert all(p.dtype == torch.float32 for p in loss.parameters())


def test_the_loss_alone_matches_the_reference_and_reads_the_target_critics():
    loss = perturbed_loss(3, hidden=(16, 16))
    batch = random_transitions(B, OBS, ACT, 3)
    out = loss(batch.clone()).detach()
    expected = ReferenceIQL.from_loss(loss).losses(batch)
    wrong = ReferenceIQL.from_loss(loss, variant="online_critics_for_value").losses(batch)
    for key in ("loss_value", "loss_actor", "loss_qvalue"):
        assert float(out[key]) == pytest.approx(expected[key], rel=1e-5), key
    for key in ("loss_value", "loss_actor"):
        assert wrong[key] != pytest.approx(expected[key], rel=1e-3), key
