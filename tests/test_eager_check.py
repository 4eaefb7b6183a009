"""A compiled step proves itself: its first calls are also taken eagerly and a wrong one never trains.

The wrong compiled steps here are planted, only when compiled: the actor's two 6-element tensors stepped the
wrong way at the job's shapes (those tensors two learning rates off, the actor as a whole 0.026: a fault only a
comparison per tensor sees), and, for vmapped seeds, the actor's Adam step taken twice (every actor tensor about
one learning rate from the eager step, twenty times the check's bound). A correct compiled step stays below a
tenth of the bound.
"""
import math
import re

import pytest
import torch

from synthetic import random_transitions

from iql_torchrl import IQLLoss, StepMismatch, make_iql_networks
from iql_torchrl.objectives.ensemble import SeedEnsemble
from iql_torchrl.step.eager_check import tolerance
from iql_torchrl.step.update import IQLUpdate

N, B, OBS, ACT = 512, 32, 3, 2
JOB_N, JOB_OBS, JOB_ACT = 4_096, 17, 6


class DoubledActorStep(IQLUpdate):
    """A miscompiled step, planted: compiled, the actor's Adam step is taken twice (eager, once)."""

    def _optimizer_step(self, group, grads):
        super()._optimizer_step(group, grads)
        if group == "actor" and torch.compiler.is_compiling():
            super()._optimizer_step(group, grads)


class WrongWaySmallActorTensors(IQLUpdate):
    """A miscompiled step, planted: compiled, the actor's action-sized tensors (its log-std and the mean head's
    bias) step the wrong way (eager, the right way): each ends about two learning rates from eager's."""

    action_size = 6

    def _optimizer_step(self, group, grads):
        compiled = torch.compiler.is_compiling() and group == "actor"
        small = [p for p in self.params[group] if compiled and p.ndim == 1 and p.numel() == self.action_size]
        before = [p.clone() for p in small]
        super()._optimizer_step(group, grads)
        for p, b in zip(small, before):
            p.copy_(2 * b - p)


def compiled(kind, loss, **kwargs):
    """``kind(loss)`` in compile mode."""
    return kind(loss, mode="compile", **kwargs)


def make_loss(seed=1):
    torch.manual_seed(seed)
    return IQLLoss(*make_iql_networks(OBS, ACT, hidden_sizes=(16, 16)))


def indices(steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, N, (B,), generator=g) for _ in range(steps)]


def params(loss):
    return {k: v.detach().clone() for k, v in loss.state_dict().items()}


def named(message: str) -> set[str]:
    return set(re.findall(r"(\w+) parameters differ", message))


def job_shaped(kind, **kwargs):
    """At the job's shapes (obs 17, action 6, 2×256 networks, batch 256): a loss, ``kind`` compiled for it, its data
    and a stream of batches' indices."""
    torch.manual_seed(1)
    loss = IQLLoss(*make_iql_networks(JOB_OBS, JOB_ACT, hidden_sizes=(256, 256)))
    data = random_transitions(JOB_N, JOB_OBS, JOB_ACT)
    g = torch.Generator().manual_seed(0)
    stream = [torch.randint(0, JOB_N, (256,), generator=g) for _ in range(4)]
    return loss, (compiled(kind, loss, data=data, **kwargs) if kind else IQLUpdate(loss, data=data)), stream


def test_a_compiled_step_that_steps_two_six_element_actor_tensors_the_wrong_way_is_caught_before_it_trains():
    # the fault moves 12 of the actor's 71,948 parameters
    loss, update, stream = job_shaped(WrongWaySmallActorTensors)
    before = params(loss)
    with pytest.raises(StepMismatch) as caught:
        update(stream[0])
    message = str(caught.value)
    assert named(message) == {"actor"}, message  # the critics and V were stepped right
    tensor, rms = re.search(r"actor parameters differ by \S+ in (\S+) \(root mean square: (\S+)×", message).groups()
    assert tensor in ("module.0.module.log_std", "module.0.module.net.4.bias"), message
    assert 1.5 < float(rms) < 2.5, message  # a step the wrong way: two learning rates
    assert "Nothing of this update was applied" in message and "mode='eager'" in message
    assert all(torch.equal(a, b) for a, b in zip(before.values(), params(loss).values()))
    assert int(update.step) == 0
    # the wrong variant: the actor's root mean square over the whole network stays under the bound
    gaps = update.runner.check.last["actor"]
    whole = math.sqrt(sum(g.rms**2 * g.numel for g in gaps) / sum(g.numel for g in gaps)) / gaps[0].lr
    assert whole < tolerance("fp32") < float(rms), whole


def test_with_fall_back_the_mismatched_update_is_the_eager_step_s_and_the_step_runs_eager_from_then_on():
    eager_loss, eager, stream = job_shaped(None)
    checked_loss, checked, _ = job_shaped(WrongWaySmallActorTensors, fall_back_to_eager=True)
    with pytest.warns(UserWarning, match=r"actor parameters differ .* runs eager from here"):
        checked(stream[0])
    for idx in stream:
        eager(idx)
    for idx in stream[1:]:
        checked(idx)
    for (key, a), b in zip(params(eager_loss).items(), params(checked_loss).values()):
        assert torch.equal(a, b), key
    # the wrong variant: the planted step, unchecked, trains a different actor
    planted_loss, planted, _ = job_shaped(WrongWaySmallActorTensors, eager_checks=0)
    for idx in stream:
        planted(idx)
    small = ["actor_network_params.module.0.module.log_std", "actor_network_params.module.0.module.net.4.bias"]
    assert not any(torch.allclose(params(eager_loss)[k], params(planted_loss)[k], atol=1e-5) for k in small)


def test_a_correct_compiled_step_passes_its_checks_and_trains_bitwise_as_if_unchecked():
    # built as test_update's fast several-steps row builds its step (16×16, 512 transitions, 5 steps): the
    # session compiles it once for both
    data = random_transitions(N, OBS, ACT)
    stream = indices(5)
    checked_loss, unchecked_loss = make_loss(), make_loss()
    checked = compiled(IQLUpdate, checked_loss, data=data, total_steps=5)
    unchecked = compiled(IQLUpdate, unchecked_loss, data=data, total_steps=5, eager_checks=0)
    for idx in stream:
        a, b = checked(idx), unchecked(idx)
        assert all(torch.equal(a[k], b[k]) for k in a.keys())
    for (key, a), b in zip(params(checked_loss).items(), params(unchecked_loss).values()):
        assert torch.equal(a, b), key
    check = checked.runner.check
    assert check.checked == 3  # the call that compiled and the two after it
    assert max(check.largest.values()) < tolerance(None) / 10, check.largest


@pytest.mark.slow
def test_vmapped_seeds_compiled_with_a_wrong_step_are_caught_too():
    data = random_transitions(N, OBS, ACT)
    ensemble = SeedEnsemble([make_loss(1), make_loss(2)])
    update = compiled(DoubledActorStep, ensemble, data=data)
    with pytest.raises(StepMismatch, match="actor parameters differ"):
        update(torch.stack(indices(2)))


def test_the_bound_is_wider_under_bf16_whose_first_update_rounds_more():
    assert tolerance("fp32") == 0.05
    assert tolerance("bf16") > 0.16  # measured at the first bf16 update (CPU, the default shapes)
    assert tolerance("bf16") < 0.5  # still half the planted error


def test_eager_checks_must_be_a_count():
    with pytest.raises(ValueError, match="check_calls must be >= 0"):
        IQLUpdate(make_loss(), mode="compile", eager_checks=-1)
