"""The fused update step: order, optimizers, cosine actor LR, soft target update, modes, state."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reference import ReferenceIQL, as_float64, critic, gaussian_log_prob, num_critics, value
from synthetic import random_transitions
from test_live_settings import CUDA_TOL  # the 16-wide CUDA comparisons' tolerance, from an H100 reading

from iql_torchrl import IQLLoss, make_iql_networks
from iql_torchrl.step.optimizers import adam_step, make_adam
from iql_torchrl.step.update import IQLUpdate, cosine_decay

N, B, OBS, ACT = 512, 32, 3, 2


def dataset(seed=0):
    return random_transitions(N, OBS, ACT, seed)


def make_update(data=None, seed=1, actor_dropout=0.0, device="cpu", actor_kind="gaussian", **kwargs):
    torch.manual_seed(seed)
    loss = IQLLoss(*make_iql_networks(OBS, ACT, hidden_sizes=(16, 16), actor_dropout=actor_dropout,
                                      actor_kind=actor_kind)).to(device)
    return loss, IQLUpdate(loss, data=data, **kwargs)


def index_stream(steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, N, (B,), generator=g) for _ in range(steps)]


def params(loss):
    return {k: v.detach().clone() for k, v in loss.state_dict().items()}


def td_errors(critics, value_params, batch, gamma=0.99):
    """Each transition's TD error, float64, by hand: max over critics of (Q_i(s, a) − r − γ·(1 − d)·V(s'))²."""
    target = batch["reward"] + gamma * (1 - batch["terminated"]) * value(value_params, batch["next_observation"])
    return torch.stack([(critic(critics, i, batch["observation"], batch["action"]) - target) ** 2
                        for i in range(num_critics(critics))]).max(0).values


@pytest.mark.parametrize("mode", ["eager", "compile"])
def test_every_mode_writes_the_td_error_and_log_prob_into_the_caller_s_batch(mode):
    """As TorchRL's losses do, the step leaves in the batch it is given each transition's TD error under the
    priority key (a prioritized replay buffer's update_tensordict_priority reads it) and log π(a|s): the
    values of the networks the step evaluated (paper order: the critics before their step, V after its own,
    the actor before its step). The same batch passed again gets the new values, and a compiled step
    compiles once for it."""
    loss, update = make_update(mode=mode)
    reference = ReferenceIQL.from_loss(loss)  # float64, the same initial parameters and Adam
    batch = dataset()[:B].clone()
    tol = {"rtol": 1e-5, "atol": 1e-6}  # float32 against float64: measured < 1e-6 relative
    for call in range(2):
        plain = as_float64(batch)
        critics, actor, old_value = reference.critics, reference.actor, reference.value
        reference.step(plain)
        expected_td = td_errors(critics, reference.value, plain)
        expected_log_prob = gaussian_log_prob(actor, plain["observation"], plain["action"])
        stale = {key: batch.get(key, None) for key in ("td_error", "_log_prob")}
        update(batch)
        assert torch.allclose(batch["td_error"].double(), expected_td, **tol), call
        assert torch.allclose(batch["_log_prob"].double(), expected_log_prob, **tol), call
        # the wrong variants: V before its step, the critics or the actor after theirs, the previous call's values
        for wrong in (td_errors(critics, old_value, plain), td_errors(reference.critics, reference.value, plain)):
            assert not torch.allclose(wrong, expected_td, rtol=100 * tol["rtol"], atol=100 * tol["atol"])
        after_step = gaussian_log_prob(reference.actor, plain["observation"], plain["action"])
        assert not torch.allclose(after_step, expected_log_prob, rtol=100 * tol["rtol"], atol=100 * tol["atol"])
        if call:
            assert not torch.allclose(stale["td_error"].double(), expected_td, rtol=100 * tol["rtol"])
    assert update.compilations == (mode == "compile")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_a_cuda_graph_step_writes_the_td_error_and_log_prob_into_the_caller_s_batch_as_eager_does():
    """Past its warm-up and capture, each replay leaves in the caller's batch the TD error and log-probability of
    that call (not the captured call's, not the previous replay's), equal to the eager step's on the same batches;
    the entries are the caller's own tensors, which the next replay does not overwrite."""
    _, eager = make_update(device="cuda", total_steps=20)
    _, graphed = make_update(device="cuda", total_steps=20, mode="cudagraphs")
    batches = [random_transitions(B, OBS, ACT, seed).to("cuda") for seed in range(8)]
    kept = []
    for call, batch in enumerate(batches):  # warm-up calls, the capture, replays
        expected = batch.clone()
        eager(expected)
        graphed(batch)
        for key in ("td_error", "_log_prob"):
            assert torch.allclose(batch[key], expected[key], **CUDA_TOL), (call, key)
        if call:  # the wrong variant: the previous call's values left in place
            assert not torch.allclose(batch["td_error"], batches[call - 1]["td_error"], **CUDA_TOL), call
        kept.append(batch["td_error"].clone())
    assert all(torch.equal(batch["td_error"], k) for batch, k in zip(batches, kept))


def test_cosine_decay_goes_from_one_to_zero():
    steps = torch.tensor([0, 50, 100, 150])
    assert torch.allclose(cosine_decay(steps, 100), torch.tensor([1.0, 0.5, 0.0, 0.0]), atol=1e-7)


def test_actor_lr_follows_the_cosine_while_value_and_qvalue_lr_stay():
    data = dataset()
    _, update = make_update(data, total_steps=8)
    lrs = [float(update(i)["actor_lr"]) for i in index_stream(8)]
    expected = [3e-4 * 0.5 * (1 + math.cos(math.pi * t / 8)) for t in range(8)]
    assert lrs == pytest.approx(expected, rel=1e-5)
    assert float(update.value_optimizer.param_groups[0]["lr"]) == pytest.approx(3e-4)
    assert float(update.qvalue_optimizer.param_groups[0]["lr"]) == pytest.approx(3e-4)


def test_target_critics_move_by_tau_towards_the_updated_critics():
    data = dataset()
    loss, update = make_update(data, tau=0.1)
    target_before = loss.target_qvalue_network_params.detach().clone()
    update(index_stream(1)[0])
    online_after = loss.qvalue_network_params.detach()
    expected = target_before * 0.9 + online_after * 0.1
    assert all(
        torch.allclose(a, b, atol=1e-7)
        for a, b in zip(loss.target_qvalue_network_params.values(True, True), expected.values(True, True))
    )


def test_paper_order_steps_v_before_the_actor_and_critic_use_it():
    # one paper step = V's Adam step, then actor/critic losses computed with the NEW V
    data = dataset()
    batch_idx = index_stream(1)[0]
    loss, update = make_update(data)
    metrics = update(batch_idx)
    reference, _ = make_update(data)
    optimizer = torch.optim.Adam(reference.value_network_params.values(True, True), lr=3e-4)
    value_out, min_q = reference.value_phase(data[batch_idx])
    value_out["loss_value"].backward()
    optimizer.step()
    with torch.no_grad():
        after_v = reference.actor_critic_phase(data[batch_idx], min_q)
    assert torch.allclose(metrics["loss_actor"], after_v["loss_actor"], rtol=1e-5)
    assert torch.allclose(metrics["loss_qvalue"], after_v["loss_qvalue"], rtol=1e-5)
    summed_loss, summed = make_update(data, order="summed")
    before_v = summed(batch_idx)
    assert not torch.allclose(before_v["loss_qvalue"], metrics["loss_qvalue"])


def test_batches_and_indices_into_device_data_give_the_same_step():
    data = dataset()
    loss_a, by_index = make_update(data)
    loss_b, by_batch = make_update()
    for idx in index_stream(3):
        by_index(idx)
        by_batch(data[idx])
    assert all(torch.equal(a, b) for a, b in zip(params(loss_a).values(), params(loss_b).values()))


def test_a_non_finite_loss_is_recorded_with_its_step_without_stopping_the_step():
    data = dataset()
    data["next", "reward"][7] = float("nan")
    _, update = make_update(data)
    clean = torch.arange(8, 8 + B)
    update(clean)
    assert update.nonfinite_report() is None
    update(torch.arange(0, B))  # holds transition 7
    update(clean)
    report = update.nonfinite_report()
    assert report is not None and "loss_qvalue" in report and "step 1" in report


def test_state_dict_resume_continues_bitwise():
    data = dataset()
    stream = index_stream(6)
    loss_a, straight = make_update(data, total_steps=6)
    for idx in stream:
        straight(idx)
    loss_b, first = make_update(data, total_steps=6)
    for idx in stream[:3]:
        first(idx)
    saved = {"loss": params(loss_b), "update": first.state_dict()}
    loss_c, resumed = make_update(data, seed=99, total_steps=6)
    loss_c.load_state_dict(saved["loss"])
    resumed.load_state_dict(saved["update"])
    for idx in stream[3:]:
        resumed(idx)
    assert int(resumed.step) == 6
    assert all(torch.equal(a, b) for a, b in zip(params(loss_a).values(), params(loss_c).values()))


def test_unknown_order_and_mode_are_refused():
    with pytest.raises(ValueError, match="order"):
        make_update(order="backwards")
    with pytest.raises(ValueError, match="mode"):
        make_update(mode="jit")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cudagraphs_without_cuda_is_a_clear_error():
    with pytest.raises(RuntimeError, match="needs CUDA"):
        make_update(mode="cudagraphs")


# with the actor's dropout: test_compiled_step_follows_a_new_batch_shape_dropout_switched_off_and_on_and_new_data
@pytest.mark.parametrize("order, actor_kind", [
    ("paper", "gaussian"), *(pytest.param(*row, marks=pytest.mark.slow) for row in (
        ("summed", "gaussian"), ("paper", "deterministic")))])
def test_compiled_step_matches_eager_after_several_steps(order, actor_kind):
    # tolerance: float32 reassociation in inductor's kernels; 1e-5 relative after 5 steps
    data = dataset()
    stream = index_stream(5)
    loss_e, eager = make_update(data, total_steps=5, order=order, actor_kind=actor_kind)
    loss_c, compiled = make_update(data, total_steps=5, order=order, mode="compile", actor_kind=actor_kind)
    for seed, idx in enumerate(stream):
        torch.manual_seed(seed)
        eager(idx)
        torch.manual_seed(seed)
        metrics = compiled(idx)
    assert not bool(metrics["non_finite"])
    for (key, a), b in zip(params(loss_e).items(), params(loss_c).values()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), key


@pytest.mark.parametrize("mode", ["eager", pytest.param("compile", marks=pytest.mark.slow), pytest.param(
    "cudagraphs", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def test_padding_that_a_mask_drops_does_not_move_the_step(mode):
    """A batch padded with masked-out transitions (a SliceSampler's ("collector", "mask")) trains every
    network as the unpadded batch does; the padding, garbage on purpose, must not count. On CUDA the padded
    step is the CUDA graph's, past its warm-up and capture into replays."""
    device, steps, tol = ("cuda", 8, CUDA_TOL) if mode == "cudagraphs" else ("cpu", 3, {"rtol": 1e-5, "atol": 1e-6})
    data = dataset().to(device)
    loss_plain, plain = make_update(device=device)
    loss_padded, padded = make_update(mode=mode, device=device)
    garbage = dataset(seed=7)[:8].apply(lambda t: t * 50 if t.is_floating_point() else t).to(device)
    for idx in index_stream(steps):
        plain(data[idx])
        both = torch.cat([data[idx], garbage])
        padded(both.set(("collector", "mask"), torch.arange(len(both), device=device) < len(idx)))
    for (key, a), b in zip(params(loss_plain).items(), params(loss_padded).values()):
        assert torch.allclose(a, b, **tol), key
    _, unmasked = make_update(device=device)
    for idx in index_stream(steps):
        unmasked(torch.cat([data[idx], garbage]))
    assert not all(torch.allclose(a, b, rtol=1e-3) for a, b in zip(params(loss_plain).values(), params(_).values()))


def column_major(data):
    """The same transitions, every matrix laid out column by column (same shapes, other strides)."""
    return data.apply(lambda t: t.t().contiguous().t() if t.dim() == 2 else t.clone())


@pytest.mark.slow
def test_compiled_step_follows_a_new_batch_shape_dropout_switched_off_and_on_and_new_data():
    # The compiled step skips dynamo's guards once it has met a call's signature; a new batch size, the actor's
    # dropout put in eval mode and back in train mode, and a new dataset with other sizes and strides must still
    # be seen (compiled anew, or the earlier compilation reused), as eager sees them.
    data = dataset()
    g = torch.Generator().manual_seed(3)
    calls = [torch.randint(0, N, (B,), generator=g), torch.randint(0, N, (B,), generator=g),
             torch.randint(0, N, (B // 2,), generator=g), "eval", torch.randint(0, N, (B // 2,), generator=g),
             "train", torch.randint(0, N, (B // 2,), generator=g),
             "new data", torch.randint(0, 2 * N, (B // 2,), generator=g)]
    new_data = column_major(random_transitions(2 * N, OBS, ACT, seed=5))
    results = []
    for mode in ("eager", "compile"):
        loss, update = make_update(data, total_steps=5, mode=mode, actor_dropout=0.5)
        for seed, call in enumerate(calls):
            if call == "eval":
                loss.actor_network.eval()
            elif call == "train":
                loss.actor_network.train()
            elif call == "new data":
                update.data = new_data
            else:
                torch.manual_seed(seed)
                update(call)
        results.append(params(loss))
    for (key, a), b in zip(results[0].items(), results[1].values()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), key
    assert update.compilations == 4  # batch 32, 16, 16 with dropout off, the new data: dropout back on reuses the second
    # the wrong variant: the step with dropout off taken with dropout still on moves the actor elsewhere
    loss, update = make_update(data, total_steps=5, actor_dropout=0.5)
    for seed, call in enumerate(calls):
        if call == "new data":
            update.data = new_data
        elif call not in ("eval", "train"):
            torch.manual_seed(seed)
            update(call)
    actor_key = next(k for k in results[0] if k.startswith("actor_network_params") and k.endswith("net.0.weight"))
    assert not torch.allclose(params(loss)[actor_key], results[0][actor_key], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_two_compiled_steps_in_one_process_each_train_their_own_networks():
    # two compiled steps of the same class: each must keep running its own graph on its own parameters
    data = dataset()
    stream = index_stream(4)
    losses = {}
    for mode in ("eager", "compile"):
        first_loss, first = make_update(data, seed=1, total_steps=4, mode=mode)
        second_loss, second = make_update(data, seed=2, total_steps=4, mode=mode)
        for idx in stream:
            first(idx)
            second(idx.flip(0))
        losses[mode] = (params(first_loss), params(second_loss))
    for eager, compiled in zip(losses["eager"], losses["compile"]):
        for (key, a), b in zip(eager.items(), compiled.values()):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), key
    # the wrong variant: the networks swapped (a weight: the two inits differ there, log_std starts at 0 in both)
    key = next(k for k in losses["eager"][0] if k.endswith("weight"))
    assert not torch.allclose(losses["eager"][0][key], losses["compile"][1][key], rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_step_matches_eager_on_cuda():
    data = dataset().to("cuda")
    stream = [i.to("cuda") for i in index_stream(20)]
    torch.manual_seed(1)
    loss_e = IQLLoss(*make_iql_networks(OBS, ACT, hidden_sizes=(16, 16))).to("cuda")
    eager = IQLUpdate(loss_e, data=data, total_steps=20)
    torch.manual_seed(1)
    loss_g = IQLLoss(*make_iql_networks(OBS, ACT, hidden_sizes=(16, 16))).to("cuda")
    graphed = IQLUpdate(loss_g, data=data, total_steps=20, mode="cudagraphs")
    for idx in stream:
        eager(idx)
        metrics = graphed(idx)
    for (key, a), b in zip(params(loss_e).items(), params(loss_g).values()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), key
    # the metrics returned are a copy: the next replay does not overwrite them
    before = metrics.clone()
    graphed(stream[0])
    assert all(torch.equal(before[k], metrics[k]) for k in before.keys())
    # a state loaded after capture reaches the captured graph (loaded in place)
    state = eager.state_dict()
    loss_g.load_state_dict(loss_e.state_dict())
    graphed.load_state_dict(state)
    eager(stream[1])
    graphed(stream[1])
    for (key, a), b in zip(params(loss_e).items(), params(loss_g).values()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), key


def test_a_replay_s_input_must_keep_the_captured_entries_shapes_and_dtypes():
    """A CUDA graph copies each call's batch into the input it captured: that copy would cast another dtype and leave
    an entry the batch lacks as captured (eager would promote, or raise), so any such change is refused."""
    from iql_torchrl.step.cuda_graph import input_structure, structure_change

    batch = random_transitions(B, OBS, ACT)
    captured = input_structure(batch)
    assert structure_change(captured, input_structure(batch.clone())) is None
    assert structure_change(captured, input_structure(random_transitions(B, OBS, ACT, seed=3))) is None  # new values
    transposed = batch.clone()
    transposed["observation"] = batch["observation"].T.contiguous().T  # another memory layout: copy_ handles it
    assert structure_change(captured, input_structure(transposed)) is None
    as_float64 = batch.clone()
    as_float64["next", "reward"] = batch["next", "reward"].double()
    assert "entry ('next', 'reward') was [32, 1] torch.float32 when captured, now [32, 1] torch.float64" in \
        structure_change(captured, input_structure(as_float64))
    assert "lacks the entry ('next', 'done')" in \
        structure_change(captured, input_structure(batch.exclude(("next", "done"))))
    weighted = batch.clone().set("_weight", torch.ones(B))  # an entry a loss may read (importance weights)
    assert "an entry the captured input lacked, '_weight'" in structure_change(captured, input_structure(weighted))
    assert "was [32, 3] torch.float32 when captured, now [64, 3]" in \
        structure_change(captured, input_structure(random_transitions(2 * B, OBS, ACT)))
    indices = torch.arange(B)
    assert "the input was [32] torch.int64" in structure_change(input_structure(indices), input_structure(indices[:8]))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_a_cuda_graph_step_refuses_a_batch_of_another_dtype_or_entries():
    batch = random_transitions(B, OBS, ACT).to("cuda")
    _, graphed = make_update(device="cuda", total_steps=20, mode="cudagraphs")
    for _ in range(6):  # warm-up calls, the capture, replays
        graphed(batch.clone())
    as_float64 = batch.clone()
    as_float64["next", "reward"] = batch["next", "reward"].double()
    with pytest.raises(ValueError, match=r"entry \('next', 'reward'\) was \[32, 1\] torch.float32"):
        graphed(as_float64)
    with pytest.raises(ValueError, match="lacks the entry"):
        graphed(batch.exclude(("next", "done")))
    graphed(batch.clone())  # the same structure replays again


def test_update_state_saved_by_the_previous_fused_adam_step_loads_and_continues():
    # earlier releases kept three torch.optim.Adam(fused=True) optimizers and saved their state_dicts
    data = dataset()
    stream = index_stream(2)
    loss, update = make_update(data, total_steps=4)
    previous = {}
    for name, params in update.params.items():
        optimizer = torch.optim.Adam(params, lr=torch.tensor(3e-4), fused=True)
        for p in params:
            p.grad = torch.full_like(p, 0.5)
        optimizer.step()
        previous[name] = optimizer.state_dict()
        for p in params:
            p.grad = None
    state = {"step": torch.tensor(1), "actor_lr": torch.tensor(2e-4), "first_nonfinite_step": torch.tensor(-1),
             "nonfinite_losses": torch.zeros(3, dtype=torch.bool), "optimizers": previous}
    update.load_state_dict(state)
    assert float(update.actor_lr) == pytest.approx(2e-4)
    first = update.params["qvalue"][0]
    assert torch.allclose(update.qvalue_optimizer.state[first]["exp_avg"], torch.full_like(first, 0.05))
    update(stream[0])
    assert int(update.step) == 2 and float(update.qvalue_optimizer.state[first]["step"]) == 2.0


def test_loading_a_state_keeps_the_tensors_the_step_holds():
    # a compiled step and a captured CUDA graph read these tensors: loading must write into them
    data, stream = dataset(), index_stream(3)
    _, source = make_update(data, total_steps=4)
    for idx in stream:
        source(idx)
    _, update = make_update(data, total_steps=4)
    held = {name: [t for p in update.params[name] for t in update.optimizers[name].state[p].values()]
            for name in update.optimizers}
    lrs = {name: opt.param_groups[0]["lr"] for name, opt in update.optimizers.items()}
    update.load_state_dict(source.state_dict())
    for name, opt in update.optimizers.items():
        now = [t for p in update.params[name] for t in opt.state[p].values()]
        assert all(a is b for a, b in zip(held[name], now)) and len(now) == len(held[name]), name
        assert opt.param_groups[0]["lr"] is lrs[name]
        loaded = [t for p in source.params[name] for t in source.optimizers[name].state[p].values()]
        assert all(torch.equal(a, b) for a, b in zip(now, loaded)), name
    assert float(update.optimizers["qvalue"].state[update.params["qvalue"][0]]["step"]) == 3.0


def test_adamw_decays_weights_apart_from_the_gradient_and_each_network_gets_its_own_rate():
    # first Adam step: every element moves by lr·g/(|g| + eps) ≈ ±lr; AdamW also multiplies the
    # weights by (1 − lr·wd) first, so against the same step without decay the difference is
    # exactly −lr·wd·p0. Adam's coupled L2 (wd added to the gradient) differs: still ≈ ±lr moves.
    data, idx = dataset(), index_stream(1)[0]
    lrs = dict(lr=3e-4, value_lr=1e-3, qvalue_lr=2e-4)

    def first_step(**kwargs):
        loss, update = make_update(data, **lrs, **kwargs)
        before = params(loss)
        update(idx)
        return before, params(loss)

    p0, plain = first_step()
    _, adamw = first_step(optimizer="adamw", weight_decay=0.5)
    _, coupled = first_step(optimizer="adam", weight_decay=0.5)
    value_keys = [k for k in p0 if k.startswith("value_network_params")]
    for key in value_keys:
        expected = plain[key] - 1e-3 * 0.5 * p0[key]
        assert torch.allclose(adamw[key], expected, atol=1e-7), key
    wrong = max(float((coupled[k] - plain[k] + 1e-3 * 0.5 * p0[k]).abs().max()) for k in value_keys)
    assert wrong > 1e-5
    moves = {prefix: max(float((plain[k] - p0[k]).abs().max()) for k in p0 if k.startswith(prefix))
             for prefix in ("value_network_params", "qvalue_network_params")}
    assert moves["value_network_params"] == pytest.approx(1e-3, rel=1e-3)
    assert moves["qvalue_network_params"] == pytest.approx(2e-4, rel=1e-3)


@pytest.mark.slow
def test_a_compiled_step_with_dropout_draws_eager_s_masks_and_leaves_inductor_s_settings_as_they_were(monkeypatch):
    """Compiled dropout draws its masks with eager's random ops (inductor's fallback_random) in this step's
    compilation only: inductor never swaps in its own random ops there (on CUDA they would draw other
    masks than eager; on the CPU it keeps eager's either way), and the user's other compiled code keeps
    inductor's settings. Setting the flag for the whole process (``torch._inductor.config.fallback_random
    = True``) fails the second part; leaving it out of the step's compilation fails the first."""
    import torch._inductor.fx_passes.joint_graph as joint_graph

    swaps = []
    real_swap = joint_graph.replace_random_passes
    monkeypatch.setattr(joint_graph, "replace_random_passes", lambda graph: swaps.append(1) or real_swap(graph))
    before = torch._inductor.config.get_config_copy()
    data = dataset()
    _, compiled = make_update(data, total_steps=2, mode="compile", actor_dropout=0.1)
    for idx in index_stream(2):
        compiled(idx)
    assert swaps == []
    after = torch._inductor.config.get_config_copy()
    assert after["fallback_random"] is False
    assert {k: v for k, v in after.items() if before.get(k) != v} == {}


@pytest.mark.parametrize("order", ["paper", "summed"])
def test_v_and_q_train_alike_whatever_the_temperature_since_they_never_read_the_actor(order):
    # IQL's V and Q losses use dataset actions only, and the AWR weight exp(β·(Q̄ − V)) is a constant to
    # the actor's loss: two runs that differ only in β, from the same initialisation on the same batches,
    # must give the same V and Q to the bit, and different actors. A weight with gradient into V or Q
    # (the advantage not detached) or a target drawn from the actor would make V and Q depend on β.
    data = dataset()
    trained = {}
    for beta in (1.0, 10.0):
        torch.manual_seed(1)
        loss = IQLLoss(*make_iql_networks(OBS, ACT, hidden_sizes=(16, 16)), temperature=beta)
        update = IQLUpdate(loss, data=data, order=order, total_steps=20)
        for idx in index_stream(20):
            update(idx)
        trained[beta] = params(loss)
    low, high = trained[1.0], trained[10.0]
    critic_keys = [k for k in low if k.startswith(("value_network", "qvalue_network", "target_qvalue_network"))]
    actor_keys = [k for k in low if k.startswith("actor_network")]
    assert critic_keys and actor_keys
    assert all(torch.equal(low[k], high[k]) for k in critic_keys)
    assert not all(torch.equal(low[k], high[k]) for k in actor_keys)


def stepped_by_torch_optim(loss, data, stream, tau, make_optimizer, grads_contiguous=False):
    """``loss`` trained as a plain torch.optim loop trains it: IQLLoss's two phases, backward(), one optimizer a
    network (``make_optimizer(name, params)``), the soft target update by hand. ``grads_contiguous``: each
    gradient made contiguous before its optimizer steps."""
    trainable = {name: [p for p in getattr(loss, f"{name}_network_params").values(True, True) if p.requires_grad]
                 for name in ("value", "actor", "qvalue")}
    optimizers = {name: make_optimizer(name, params) for name, params in trainable.items()}

    def descend(total, names):
        for name in names:
            optimizers[name].zero_grad()
        total.backward()
        for name in names:
            if grads_contiguous:
                for p in trainable[name]:
                    p.grad = p.grad.contiguous()
            optimizers[name].step()

    for idx in stream:
        td = data[idx]
        out, target_min_q = loss.value_phase(td)
        descend(out["loss_value"], ["value"])
        out = loss.actor_critic_phase(td, target_min_q)
        descend(out["loss_actor"] + out["loss_qvalue"], ["actor", "qvalue"])
        with torch.no_grad():
            for target, online in zip(loss.target_qvalue_network_params.values(True, True),
                                      loss.qvalue_network_params.values(True, True)):
                target.mul_(1 - tau).add_(online, alpha=tau)
    return loss


def rms_gaps(a, b, lr, names) -> dict:
    """Root mean square of each named network's parameter difference between losses ``a`` and ``b``, in learning
    rates."""
    return {name: float(torch.cat([(x - y).detach().flatten() for x, y in zip(
        getattr(a, f"{name}_network_params").values(True, True), getattr(b, f"{name}_network_params").values(True, True))
    ]).square().mean().sqrt()) / lr for name in names}


def test_the_compiled_step_trains_every_network_as_torch_optim_adam_does_at_the_job_s_shapes():
    # the reference: IQLLoss's two phases, backward(), one torch.optim.Adam per network, the soft target update by
    # hand (stepped_by_torch_optim); the job's shapes (2×256 networks, batch 256), paper order
    n, obs, act, batch, steps, lr, tau = 4_096, 17, 6, 256, 10, 3e-4, 0.005
    data = random_transitions(n, obs, act)
    g = torch.Generator().manual_seed(0)
    stream = [torch.randint(0, n, (batch,), generator=g) for _ in range(steps)]

    def fresh():
        torch.manual_seed(1)
        return IQLLoss(*make_iql_networks(obs, act, hidden_sizes=(256, 256)))

    def reference(value_betas=(0.9, 0.999)):
        return stepped_by_torch_optim(fresh(), data, stream, tau, lambda name, params: torch.optim.Adam(
            params, lr=lr, betas=value_betas if name == "value" else (0.9, 0.999)))

    loss = fresh()
    update = IQLUpdate(loss, data=data, lr=lr, tau=tau, total_steps=None, mode="compile")
    for idx in stream:
        update(idx)

    def gaps(a, b):
        return rms_gaps(a, b, lr, ("value", "actor", "qvalue", "target_qvalue"))

    # float32 summation orders (inductor's, the fused kernel's, torch.optim's loop) leave < 0.01 lr after 10 updates
    assert all(gap < 0.01 for gap in gaps(loss, reference()).values()), gaps(loss, reference())
    # the wrong variant: the value network's first moment lost (Adam without momentum) ends far from it
    assert gaps(loss, reference(value_betas=(0.0, 0.999)))["value"] > 0.1


@pytest.mark.parametrize("name, weight_decay", [("adam", 0.0), ("adamw", 0.1)])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_torch_s_fused_adam_eager_and_called_from_a_compiled_graph_steps_as_torch_optim_adam_does(
        name, weight_decay, layout):
    # the form a compiled step of stacked seeds in bf16 takes on the CPU, and the eager step's: three seeds of a
    # 256×256 layer and its bias; the weight stored contiguous or transposed (as a user's module may hold it), its
    # gradient in the other layout (autograd may return a transposed view, a hook a contiguous copy); the
    # learning rate changed between calls; the reference: torch.optim.Adam's for-loop form, in float64
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(3, 256, 256, generator=g), torch.randn(3, 256, generator=g)
    start = [weight if layout == "contiguous" else weight.mT.contiguous().mT, bias]
    stored = [[torch.randn(3, 256, 256, generator=g), torch.randn(3, 256, generator=g)] for _ in range(3)]
    other_layout = (lambda w: w.mT.contiguous().mT) if layout == "contiguous" else (lambda w: w.contiguous())
    grads = [[other_layout(w), b] for w, b in stored]
    assert grads[0][0].stride() != start[0].stride()
    rates = [3e-4, 1e-2, 1e-3]

    def ours(compiled):
        params = [p.clone(memory_format=torch.preserve_format) for p in start]
        optimizer = make_adam(params, rates[0], name, weight_decay, "cpu")
        step = lambda gs: adam_step(optimizer, params, gs, fused=True)
        step = torch.compile(step, fullgraph=True) if compiled else step
        for lr, gs in zip(rates, grads):
            optimizer.param_groups[0]["lr"].fill_(lr)
            step(gs)
        return params

    def reference(grads, rates):
        params = [p.double().clone() for p in start]
        adam = torch.optim.Adam(params, lr=rates[0], weight_decay=weight_decay, foreach=False,
                                decoupled_weight_decay=name == "adamw")
        for lr, gs in zip(rates, grads):
            adam.param_groups[0]["lr"] = lr
            for p, grad in zip(params, gs):
                p.grad = grad.double()
            adam.step()
        return params

    def gap(params, expected):
        return max(float((a.double() - b).abs().max()) for a, b in zip(params, expected))

    for compiled in (False, True):
        params = ours(compiled)
        assert params[0].stride() == start[0].stride()
        assert gap(params, reference(grads, rates)) < 1e-6, (compiled, gap(params, reference(grads, rates)))
        # the wrong variants, each ~1e-2 off: the first learning rate kept; the gradient read in the parameter's
        # memory order (what torch's fused kernel does with a gradient laid out otherwise)
        assert gap(params, reference(grads, [rates[0]] * 3)) > 1e-3
        in_memory_order = [[w.as_strided(w.shape, start[0].stride()), b] for w, b in grads]
        assert gap(params, reference(in_memory_order, rates)) > 1e-3


@pytest.mark.parametrize("device", ["cpu", pytest.param(
    "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def test_a_network_whose_weights_are_laid_out_transposed_trains_as_torch_optim_adam_does(device):
    # a user's networks may hold a weight transposed in memory (or channels-last); the eager step's fused Adam must
    # still step each element by its own gradient. Reference: IQLLoss's two phases, backward(), torch.optim.Adam's
    # for-loop form per network; the wrong variant (CPU): torch's fused Adam fed gradients made contiguous
    n, obs, act, batch, steps, lr = 1_024, 5, 2, 64, 4, 1e-3
    data = random_transitions(n, obs, act).to(device)
    g = torch.Generator().manual_seed(0)
    stream = [torch.randint(0, n, (batch,), generator=g).to(device) for _ in range(steps)]

    def fresh():
        torch.manual_seed(1)
        actor, critics, value_net = make_iql_networks(obs, act, hidden_sizes=(32, 32))
        for module in (m for net in (actor, *critics, value_net) for m in net.modules()):
            if isinstance(module, torch.nn.Linear):
                module.weight = torch.nn.Parameter(module.weight.detach().mT.contiguous().mT)
        return IQLLoss(actor, critics, value_net).to(device)

    def reference(fused_on_contiguous_grads=False):
        return stepped_by_torch_optim(fresh(), data, stream, 0.005, lambda name, params: torch.optim.Adam(
            params, lr=lr, foreach=False, fused=fused_on_contiguous_grads or None), fused_on_contiguous_grads)

    loss = fresh()
    update = IQLUpdate(loss, data=data, lr=lr, tau=0.005, total_steps=None, mode="eager")
    for idx in stream:
        update(idx)

    def gaps(a, b):
        return rms_gaps(a, b, lr, ("value", "actor", "qvalue"))

    for name in ("value", "actor"):  # IQLLoss stacks the critics' weights anew, contiguous
        assert any(p.stride() != p.contiguous().stride() for p in getattr(loss, f"{name}_network_params").values(True, True))
    assert max(gaps(loss, reference()).values()) < 0.01, gaps(loss, reference())
    if device == "cpu":  # CUDA's kernel checks the layouts itself
        wrong = gaps(loss, reference(fused_on_contiguous_grads=True))
        assert min(wrong["value"], wrong["actor"]) > 0.5


def test_the_cuda_compile_workaround_reaches_older_torch_only():
    from iql_torchrl.step.modes import inductor_options

    assert inductor_options("cuda", "2.11.0+cu130")["loop_ordering_after_fusion"] is False  # pytorch#176591
    assert inductor_options("cuda", "2.12.1")["loop_ordering_after_fusion"] is False
    assert "loop_ordering_after_fusion" not in inductor_options("cuda", "2.13.0")
    assert "loop_ordering_after_fusion" not in inductor_options("cuda", "2.14.0.dev20260101+cu130")
    assert "loop_ordering_after_fusion" not in inductor_options("cpu", "2.11.0")


@pytest.mark.slow
def test_the_compiled_step_runs_after_a_tensordict_cuda_graph_module_was_built(tmp_path):
    """Building tensordict's CudaGraphModule (TorchRL's scripts do, for CUDA graphs) takes TensorDict out of torch's
    pytree registry for the whole process, for good; the compiled step takes the same step as eager after it (in a
    subprocess: the change cannot be undone)."""
    script = tmp_path / "after_exclusion.py"
    script.write_text(f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import torch
from tensordict.nn.functional_modules import _exclude_td_from_pytree  # what CudaGraphModule's constructor calls
from torch.utils._pytree import SUPPORTED_NODES
from tensordict import TensorDict
from synthetic import random_transitions
from iql_torchrl import IQLLoss, IQLUpdate, make_iql_networks

_exclude_td_from_pytree().set()
assert TensorDict not in SUPPORTED_NODES
data = random_transitions(256, 3, 2)
twins = []
for mode in ("eager", "compile"):
    torch.manual_seed(1)
    loss = IQLLoss(*make_iql_networks(3, 2, hidden_sizes=(16, 16)))
    twins.append((loss, IQLUpdate(loss, data=data, total_steps=10, mode=mode)))
for step in range(3):
    batches = [data[torch.arange(32) + 32 * step].clone() for _ in twins]
    for (loss, update), batch in zip(twins, batches):
        update(batch)
    assert torch.allclose(batches[0]["td_error"], batches[1]["td_error"], rtol=1e-5, atol=1e-6)
(loss_e, _), (loss_c, update_c) = twins
assert update_c.mode == "compile"
for a, b in zip(loss_e.parameters(), loss_c.parameters()):
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
print("same")
""")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "same" in done.stdout, done.stderr[-3000:]
