"""K seeds (and settings) in one process: SeedEnsemble, vmapped, trained by one IQLUpdate like K separate runs."""
import pytest
import torch
from tensordict import TensorDict

from synthetic import random_transitions

from iql_torchrl import IQLLoss, IQLUpdate, make_iql_networks
from iql_torchrl.objectives.ensemble import SeedEnsemble

N, B, OBS, ACT, STEPS = 256, 16, 3, 2, 6


def dataset():
    return random_transitions(N, OBS, ACT)


def make_loss(seed, temperature=3.0, expectile=0.7):
    torch.manual_seed(seed)
    return IQLLoss(*make_iql_networks(OBS, ACT, hidden_sizes=(16, 16)), temperature=temperature, expectile=expectile)


def index_stream(seed, batch=B):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, N, (batch,), generator=g) for _ in range(STEPS)]


def flat_params(loss):
    return {k: v.detach().clone() for k, v in TensorDict.from_module(loss).items(True, True)}


@pytest.mark.parametrize("order", ["paper", "summed"])
def test_vmapped_seeds_match_separate_single_seed_runs(order):
    # tolerance: batched (vmapped) GEMMs may sum in another order than plain ones; 1e-5 relative
    data, seeds = dataset(), [3, 4, 5]
    singles = []
    for seed in seeds:
        loss = make_loss(seed)
        update = IQLUpdate(loss, data=data, total_steps=STEPS, order=order)
        for idx in index_stream(seed):
            update(idx)
        singles.append(loss)
    ensemble = SeedEnsemble([make_loss(seed) for seed in seeds])
    update = IQLUpdate(ensemble, data=data, total_steps=STEPS, order=order)
    streams = [index_stream(seed) for seed in seeds]
    for step in range(STEPS):
        metrics = update(torch.stack([stream[step] for stream in streams]))
    assert metrics["loss_value"].shape == (3,)
    for k, single in enumerate(singles):
        expected, got = flat_params(single), flat_params(ensemble.seed_loss(k))
        for key in expected:
            assert torch.allclose(expected[key], got[key], rtol=1e-5, atol=1e-6), (k, key)
    # and the seeds really are different agents
    first, second = flat_params(ensemble.seed_loss(0)), flat_params(ensemble.seed_loss(1))
    assert not any(torch.equal(first[k], second[k]) for k in first if k[0] == "actor_network_params")


def _train_ensemble(losses, streams, data, torch_seed):
    torch.manual_seed(torch_seed)
    ensemble = SeedEnsemble(losses)
    update = IQLUpdate(ensemble, data=data, total_steps=STEPS)
    for step in range(STEPS):
        update(torch.stack([stream[step] for stream in streams]))
    return [flat_params(ensemble.seed_loss(k)) for k in range(len(losses))]


def test_vmapped_seeds_with_actor_dropout_draw_their_own_masks_reproducibly():
    # With dropout, what holds is: every seed draws its own masks (two seeds with the same
    # initialisation and the same batches end apart), and a run is reproducible from its torch seed;
    # what does not hold is equality with the separate single-seed run, whose masks come from
    # another random stream (the README says so).
    data = dataset()

    def dropout_loss(seed):
        torch.manual_seed(seed)
        return IQLLoss(*make_iql_networks(OBS, ACT, hidden_sizes=(16, 16), actor_dropout=0.1))

    same_batches = [index_stream(3)] * 2
    twins = _train_ensemble([dropout_loss(3), dropout_loss(3)], same_batches, data, torch_seed=0)
    actor_keys = [k for k in twins[0] if k[0] == "actor_network_params"]
    assert any(not torch.allclose(twins[0][k], twins[1][k], atol=1e-6) for k in actor_keys)
    critic_keys = [k for k in twins[0] if k[0] == "value_network_params"]  # V sees no dropout
    assert all(torch.equal(twins[0][k], twins[1][k]) for k in critic_keys)

    again = _train_ensemble([dropout_loss(3), dropout_loss(3)], same_batches, data, torch_seed=0)
    assert all(torch.equal(twins[i][k], again[i][k]) for i in range(2) for k in twins[i])

    separate = dropout_loss(3)
    update = IQLUpdate(separate, data=data, total_steps=STEPS)
    torch.manual_seed(0)
    for idx in index_stream(3):
        update(idx)
    alone = flat_params(separate)
    assert any(not torch.allclose(alone[k], twins[0][k], atol=1e-6) for k in actor_keys)


@pytest.mark.slow
def test_vmapped_seeds_without_dropout_in_the_compiled_step_match_separate_runs():
    data, seeds = dataset(), [3, 4]
    singles = []
    for seed in seeds:
        loss = make_loss(seed)
        update = IQLUpdate(loss, data=data, total_steps=STEPS)
        for idx in index_stream(seed):
            update(idx)
        singles.append(flat_params(loss))
    ensemble = SeedEnsemble([make_loss(seed) for seed in seeds])
    update = IQLUpdate(ensemble, data=data, total_steps=STEPS, mode="compile")
    streams = [index_stream(seed) for seed in seeds]
    for step in range(STEPS):
        update(torch.stack([stream[step] for stream in streams]))
    for k, expected in enumerate(singles):
        got = flat_params(ensemble.seed_loss(k))
        for key in expected:
            assert torch.allclose(expected[key], got[key], rtol=1e-5, atol=1e-6), (k, key)


def test_the_guarded_compiled_step_of_vmapped_seeds_and_settings_compiles_once_and_trains_as_eager(guarded_compile):
    # the guarded step is what a CUDA graph captures and what torchrun runs: state that the
    # first call's eager code leaves behind, read by the trace's guards, would compile it again at the second
    # call, a whole compilation inside a run's timed updates; the members differ in β and τ, as a --sweep's do
    data, seeds, settings = dataset(), [3, 4], [(0.0, 0.5), (6.0, 0.9)]
    eager, compiled = (SeedEnsemble([make_loss(s, *setting) for s, setting in zip(seeds, settings)]) for _ in range(2))
    eager_update = IQLUpdate(eager, data=data, total_steps=STEPS)
    compiled_update = IQLUpdate(compiled, data=data, total_steps=STEPS, mode="compile")
    streams = [index_stream(seed) for seed in seeds]
    for step in range(4):
        indices = torch.stack([stream[step] for stream in streams])
        compiled_update(indices)  # first, as in a run: what its trace looked up, no eager call had looked up yet
        eager_update(indices)
    assert compiled_update.compilations == 1
    expected, got = flat_params(eager), flat_params(compiled)
    for key in expected:
        assert torch.allclose(expected[key], got[key], rtol=1e-5, atol=1e-6), key


# ------------------------------------------------------------------ each member's own β and τ
SETTINGS = [(0.0, 0.5), (6.0, 0.9)]  # (β, τ): behaviour cloning at the median; a sharp AWR at a high expectile
MEMBERS = [(setting, seed) for setting in SETTINGS for seed in (3, 4)]  # setting-major, as a --sweep run


def train_alone(seed, temperature, expectile, order="paper"):
    """The separate eager run of one setting and seed: what its member must compute."""
    loss = make_loss(seed, temperature, expectile)
    update = IQLUpdate(loss, data=dataset(), total_steps=STEPS, order=order)
    for idx in index_stream(seed):
        update(idx)
    return flat_params(loss)


def train_members(members, mode="eager", change=None):
    """The members trained together, each on its seed's batches; ``change(ensemble)`` runs before update 3."""
    ensemble = SeedEnsemble([make_loss(seed, *setting) for setting, seed in members])
    update = IQLUpdate(ensemble, data=dataset(), total_steps=STEPS, mode=mode)
    streams = [index_stream(seed) for _, seed in members]
    for step in range(STEPS):
        if step == 3 and change is not None:
            change(ensemble)
        update(torch.stack([stream[step] for stream in streams]))
    return ensemble, update


def networks(flat):
    """The networks' tensors of :func:`flat_params` (nested keys; the loss's own β and τ buffers are top-level)."""
    return {key: value for key, value in flat.items() if isinstance(key, tuple)}


def assert_same(expected, got, what):
    for key in expected:
        assert torch.allclose(expected[key], got[key], rtol=1e-5, atol=1e-6), (what, key)


@pytest.mark.parametrize("order", ["paper", "summed"])
def test_each_member_trains_with_its_own_temperature_and_expectile_as_its_own_run_would(order):
    ensemble = SeedEnsemble([make_loss(seed, *setting) for setting, seed in MEMBERS])
    update = IQLUpdate(ensemble, data=dataset(), total_steps=STEPS, order=order)
    streams = [index_stream(seed) for _, seed in MEMBERS]  # the members of one seed draw the same batches
    for step in range(STEPS):
        update(torch.stack([stream[step] for stream in streams]))
    for k, (setting, seed) in enumerate(MEMBERS):
        expected, got = train_alone(seed, *setting, order), flat_params(ensemble.seed_loss(k))
        assert_same(networks(expected), got, (setting, seed))
        assert_same(expected, got, (setting, seed))  # its β and τ too
    # the plausible wrong variant, every member with the first member's β and τ, trains the others otherwise
    shared = train_alone(3, *SETTINGS[0], order)
    got = flat_params(ensemble.seed_loss(2))  # β 6, τ 0.9, seed 3
    for network in ("actor_network_params", "value_network_params"):
        keys = [key for key in got if key[0] == network]
        assert not all(torch.allclose(shared[key], got[key], rtol=1e-5, atol=1e-6) for key in keys), network
    assert ensemble.temperatures == (0.0, 0.0, 6.0, 6.0) and ensemble.expectiles == (0.5, 0.5, 0.9, 0.9)


def test_setting_the_ensembles_temperature_or_expectile_sets_every_members_and_reading_differing_ones_is_refused():
    ensemble, _ = train_members(MEMBERS[:3:2])  # seed 3 at both settings
    with pytest.raises(ValueError, match=r"temperatures differ \(0.0, 6.0\).*ensemble\.temperatures"):
        ensemble.temperature
    with pytest.raises(ValueError, match=r"expectiles differ \(0.5, 0.9\).*ensemble\.expectiles"):
        ensemble.expectile
    with pytest.raises(ValueError, match="temperature must be a number >= 0"):
        ensemble.temperature = -1.0
    assert ensemble.temperatures == (0.0, 6.0)  # a refused value changes nothing

    def to_one_setting(ensemble):
        ensemble.temperature, ensemble.expectile = 1.0, 0.7

    ensemble, _ = train_members(MEMBERS, change=to_one_setting)
    assert (ensemble.temperature, ensemble.expectile) == (1.0, 0.7)
    # from update 3 on every member trains with β 1 and τ 0.7: as its own run changed alike
    for k, (setting, seed) in enumerate(MEMBERS):
        alone = make_loss(seed, *setting)
        update = IQLUpdate(alone, data=dataset(), total_steps=STEPS)
        for step, idx in enumerate(index_stream(seed)):
            if step == 3:
                alone.temperature, alone.expectile = 1.0, 0.7
            update(idx)
        assert_same(flat_params(alone), flat_params(ensemble.seed_loss(k)), (setting, seed))


@pytest.mark.slow
def test_the_compiled_step_with_each_members_settings_matches_the_eager_step_and_follows_a_live_change():
    # mode="compile" checks its first calls against the eager step (eager_checks): a mismatch raises
    def to_a_higher_expectile(ensemble):
        ensemble.expectile = 0.8

    eager, _ = train_members(MEMBERS, change=to_a_higher_expectile)
    compiled, update = train_members(MEMBERS, mode="compile", change=to_a_higher_expectile)
    assert update.mode == "compile" and update.compilations == 1  # the live change compiled nothing
    for k, member in enumerate(MEMBERS):
        assert_same(flat_params(eager.seed_loss(k)), flat_params(compiled.seed_loss(k)), member)
