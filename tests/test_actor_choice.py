"""``--actor``: the paper's Gaussian policy, or a deterministic one (tanh of an MLP, trained by advantage-weighted
squared error: CORL's ``iql_deterministic``) on Box actions; a run trains it, saves, evaluates and exports it as
it acted; discrete data and fine-tuning refuse it before any work."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tensordict import TensorDict
from torchrl.envs.utils import ExplorationType, set_exploration_type

from iql_offline import train
from iql_torchrl.data import buffer_transitions, load_minari_dataset
from iql_torchrl.jobs import evaluate, export
from iql_torchrl.jobs.finetune import FinetuneConfig, adopt_offline_run, finetune
from iql_torchrl.runs.builders import build_loss, load_actor
from iql_torchrl.runs.checkpoint import CHECKPOINT_NAME, load_checkpoint
from iql_torchrl.runs.config import ConfigError, OfflineConfig, describe_preset, parse_cli
from iql_torchrl.runs.evaluation import evaluation_seed

from conftest import TINY_PENDULUM
from test_discrete_trainer import CARTPOLE, cartpole, cartpole_root  # noqa: F401 (fixtures)
from test_normalization import FINETUNE, TINY, exported_returns


@pytest.fixture(scope="module")
def deterministic_run(tiny_datasets_root, tmp_path_factory):
    """A behaviour-cloning run (β 0: the actor's loss is the squared error to the dataset action) of each actor."""
    runs = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MINARI_DATASETS_PATH", str(tiny_datasets_root))
        for actor in ("deterministic", "gaussian"):
            folder = tmp_path_factory.mktemp(actor) / "run"
            summary = train(OfflineConfig(dataset=TINY_PENDULUM, output_dir=folder, actor=actor, temperature=0.0,
                                          **{**TINY, "steps": 300, "eval_every": 300}))
            runs[actor] = SimpleNamespace(dir=folder, summary=summary)
    return runs


def dataset_batch(n: int = 512) -> TensorDict:
    data = buffer_transitions(load_minari_dataset(TINY_PENDULUM))
    return data[torch.arange(n)]


def test_the_flag_reads_auto_gaussian_or_deterministic_and_auto_is_the_paper_s_actor(tiny_datasets):
    assert parse_cli(OfflineConfig, ["--actor", "deterministic"])[0].actor == "deterministic"
    assert OfflineConfig().actor == "auto"
    metadata = load_minari_dataset(TINY_PENDULUM).metadata
    assert OfflineConfig(actor="auto").actor_kind(metadata) == "gaussian"
    with pytest.raises(ConfigError, match="--actor"):
        OfflineConfig(actor="beta").check()


def test_a_deterministic_run_learns_the_dataset_actions_and_acts_without_sampling(deterministic_run, tiny_datasets):
    run = deterministic_run["deterministic"]
    assert run.summary["actor"] == "deterministic" and deterministic_run["gaussian"].summary["actor"] == "gaussian"
    actor, metadata = load_actor(run.dir)
    batch = dataset_batch()
    with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
        first = actor(batch.select("observation").clone())["action"]
        again = actor(batch.select("observation").clone())["action"]
    assert torch.equal(first, again)  # nothing sampled, even where a Gaussian policy samples
    assert first.abs().max() <= 1  # tanh: inside the loader's [-1, 1] action box
    with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
        gaussian, _ = load_actor(deterministic_run["gaussian"].dir)
        assert not torch.equal(gaussian(batch.select("observation").clone())["action"],
                               gaussian(batch.select("observation").clone())["action"])

    # behaviour cloning of a deterministic actor regresses on the dataset actions: its squared error fell from the
    # untrained actor's (the same initialisation: the run's seed)
    torch.manual_seed(0)
    untrained = build_loss(OfflineConfig(dataset=TINY_PENDULUM, actor="deterministic", hidden_sizes=(16, 16),
                                         device="cpu").resolved(), metadata).actor_network
    with torch.no_grad():
        before = (untrained(batch.select("observation").clone())["action"] - batch["action"]).square().sum(-1).mean()
    after = (first - batch["action"]).square().sum(-1).mean()
    assert after < 0.9 * before, (float(after), float(before))  # 0.224 against 0.273 (80% of the data is random)


def test_a_deterministic_run_s_saved_evaluated_and_exported_policy_scores_what_the_run_scored(deterministic_run,
                                                                                             tiny_datasets):
    run = deterministic_run["deterministic"]
    report = evaluate.main([str(run.dir)])
    assert report["normalized_score"] == run.summary["normalized_score"]
    seeds = [evaluation_seed(0) + i for i in range(TINY["eval_episodes"])]
    path = export.export_policy(run.dir, format="exported-program")
    np.testing.assert_allclose(exported_returns(path, seeds), report["returns"], rtol=1e-5)
    # the check can fail: the Gaussian run's policy scores otherwise on the same episodes
    other = evaluate.main([str(deterministic_run["gaussian"].dir)])
    assert other["returns"] != report["returns"]


def test_a_deterministic_actor_on_discrete_actions_is_refused_before_any_update(cartpole, cartpole_root,  # noqa: F811
                                                                                   tmp_path, capsys, monkeypatch):
    # a built set (its action space read) and a builder's set not built yet (its environment's): refused before
    # the run says anything about itself (its preset line), writes a folder or builds the data
    empty_root = tmp_path / "no datasets"
    empty_root.mkdir()
    for dataset, root in ((cartpole, cartpole_root), ("iql_torchrl/mountain-car/mixed-v0", empty_root)):
        monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
        with pytest.raises(ConfigError, match="--actor deterministic: .*discrete actions"):
            train(OfflineConfig(dataset=dataset, output_dir=tmp_path / "run", actor="deterministic",
                                **{**TINY, "steps": 20, "eval_every": 20}))
        assert not (tmp_path / "run").exists()  # nothing trained, nothing written
        assert "preset" not in capsys.readouterr().err
        with pytest.raises(ConfigError, match="--preset hopper: its actor is deterministic, .*discrete actions"):
            train(OfflineConfig(dataset=dataset, output_dir=tmp_path / "run", preset="hopper",
                                **{**TINY, "steps": 20, "eval_every": 20}))
        assert not (tmp_path / "run").exists()
    assert not any(empty_root.iterdir())  # the set was not built


def test_fine_tuning_refuses_a_deterministic_actor_given_or_from_its_offline_run(deterministic_run, tiny_datasets,
                                                                                 tmp_path):
    with pytest.raises(ConfigError, match="--actor deterministic: fine-tuning explores by sampling the policy"):
        FinetuneConfig(dataset=TINY_PENDULUM, actor="deterministic").check()
    run = deterministic_run["deterministic"]
    config = FinetuneConfig(checkpoint=run.dir, output_dir=tmp_path / "finetune", online_steps=32, num_envs=2,
                            frames_per_batch=16, hidden_sizes=(16, 16), device="cpu", progress=False, logger="none")
    config.check()
    with pytest.raises(ConfigError, match=f"--checkpoint {run.dir} trained a deterministic actor.*--actor gaussian"):
        finetune(config)
    assert load_checkpoint(run.dir / CHECKPOINT_NAME)["config"]["actor"] == "deterministic"


def test_fine_tuning_a_gaussian_run_takes_its_actor_whether_or_not_given(deterministic_run, tiny_datasets):
    gaussian = deterministic_run["gaussian"]  # trained with --actor gaussian: the same actor as auto's
    auto_run = load_checkpoint(gaussian.dir / CHECKPOINT_NAME)
    auto_run["config"]["actor"] = "auto"  # as a run of the default stored it before the presets chose actors
    for given in ("auto", "gaussian"):
        config = adopt_offline_run(FinetuneConfig(checkpoint=gaussian.dir, actor=given), auto_run, {"actor"})
        assert config.actor == "gaussian"
    deterministic = load_checkpoint(deterministic_run["deterministic"].dir / CHECKPOINT_NAME)
    with pytest.raises(ConfigError, match="--actor: the offline run's deterministic, given gaussian"):
        adopt_offline_run(FinetuneConfig(checkpoint=gaussian.dir, actor="gaussian"), deterministic, {"actor"})


def test_the_preset_line_names_a_deterministic_actor_and_nothing_for_the_paper_s():
    line = describe_preset("mujoco", "why", OfflineConfig(actor="deterministic", preset="mujoco"))
    assert line == ("preset mujoco (expectile 0.7, temperature 3.0, reward transform locomotion, "
                    "actor deterministic (--actor; the preset's gaussian)): why")
    assert "actor" not in describe_preset("mujoco", "why", OfflineConfig(actor="gaussian", preset="mujoco"))


# ------------------------------------------------------------------ the hopper and walker2d presets
HOPPER, WALKER = "iql_torchrl/hopper/medium-expert-v1", "iql_torchrl/walker2d/medium-replay-v1"
CHEETAH = "iql_torchrl/halfcheetah/medium-v1"


def test_hopper_and_walker2d_data_take_a_deterministic_actor_and_a_slow_target_and_say_so():
    for dataset, preset, episodes in ((HOPPER, "hopper", ""), (WALKER, "walker2d", ", evaluation episodes 50")):
        config = OfflineConfig(dataset=dataset).resolved()
        assert (config.preset, config.actor, config.tau, config.expectile, config.temperature,
                config.reward_transform) == (preset, "deterministic", 0.001, 0.7, 3.0, "locomotion")
        assert describe_preset(config.preset, "why", config) == (
            f"preset {preset} (expectile 0.7, temperature 3.0, reward transform locomotion, target rate 0.001, "
            f"actor deterministic{episodes}): why")
    for dataset in ("mujoco/hopper/medium-v0", "D4RL/hopper/medium-replay-v2", "iql_torchrl/hopper/medium-v0"):
        assert OfflineConfig(dataset=dataset).resolved().preset == "hopper", dataset
    for dataset in ("mujoco/walker2d/medium-v0", "D4RL/walker2d/medium-expert-v2", "iql_torchrl/walker2d/medium-v0"):
        assert OfflineConfig(dataset=dataset).resolved().preset == "walker2d", dataset
    cheetah = OfflineConfig(dataset=CHEETAH).resolved()  # every other locomotion set: the paper's actor and target rate
    assert (cheetah.preset, cheetah.actor, cheetah.tau) == ("mujoco", "gaussian", 0.005)
    assert "target rate" not in describe_preset(cheetah.preset, "why", cheetah)
    # flags still choose: the paper's actor and target rate on hopper, said against the preset's
    given = parse_cli(OfflineConfig, ["--dataset", HOPPER, "--actor", "gaussian", "--tau", "0.005"])[0].resolved()
    assert (given.preset, given.actor, given.tau) == ("hopper", "gaussian", 0.005)
    assert ("target rate 0.005 (--tau; the preset's 0.001), actor gaussian (--actor; the preset's deterministic)"
            in describe_preset(given.preset, "why", given))
    # the walker2d preset's 50 evaluation episodes, and a run that evaluates over fewer, said against them
    fewer = parse_cli(OfflineConfig, ["--dataset", WALKER, "--eval-episodes", "10"])[0].resolved()
    assert fewer.eval_episodes == 10
    assert "evaluation episodes 10 (--eval-episodes; the preset's 50)" in describe_preset(fewer.preset, "why", fewer)


def test_the_hopper_preset_steps_its_targets_at_0_001_with_an_actor_that_does_not_sample(tiny_datasets):
    from iql_torchrl.runs.builders import make_update

    config = OfflineConfig(dataset=TINY_PENDULUM, preset="hopper", cudagraphs=False, **TINY).resolved()
    source = load_minari_dataset(TINY_PENDULUM)
    torch.manual_seed(0)
    loss = build_loss(config, source.metadata)
    observation = dataset_batch(64).select("observation")
    with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
        assert torch.equal(loss.actor_network(observation.clone())["action"],
                           loss.actor_network(observation.clone())["action"])  # a Gaussian's samples would differ
    update = make_update(config, loss, buffer_transitions(source), total_steps=None)
    read = lambda params: {k: v.detach().double().clone() for k, v in params.items(True, True)}
    target = read(loss.target_qvalue_network_params)
    update(torch.arange(32))
    online, after = read(loss.qvalue_network_params), read(loss.target_qvalue_network_params)
    for rate, close in ((0.001, True), (0.005, False)):  # the paper's rate is the plausible wrong one
        expected = {k: target[k] + rate * (online[k] - target[k]) for k in target}
        assert all(torch.allclose(after[k], expected[k], rtol=0, atol=1e-7) for k in target) is close, rate


@pytest.mark.parametrize("dataset", [HOPPER, WALKER])
def test_a_run_from_before_its_preset_resumes_as_it_trained(dataset):
    from iql_torchrl.runs.config import config_to_dict
    from iql_torchrl.runs.resume import ResumeError, resumed_config

    saved = config_to_dict(OfflineConfig(dataset=dataset, preset="mujoco", output_dir="/tmp/x").resolved())
    saved.update(actor="auto", tau=0.005)  # as a run of the mujoco preset on this data stored them
    again = OfflineConfig(dataset=dataset, output_dir="/tmp/x", resume=True)  # --preset, --actor, --tau: auto
    resumed = resumed_config(OfflineConfig, saved, again, set()).resolved()
    assert (resumed.preset, resumed.actor, resumed.tau) == ("mujoco", "gaussian", 0.005)
    with pytest.raises(ResumeError, match="--tau: checkpoint 0.005, given 0.001"):
        resumed_config(OfflineConfig, saved, OfflineConfig(dataset=dataset, tau=0.001, output_dir="/tmp/x",
                                                           resume=True), {"tau"})


def test_fine_tuning_on_hopper_takes_the_gaussian_actor_and_refuses_a_hopper_preset_run(deterministic_run, tiny_datasets,
                                                                                         tmp_path, capsys):
    config = FinetuneConfig(dataset=HOPPER).resolved()
    assert (config.preset, config.actor, config.tau) == ("hopper", "gaussian", 0.001)
    # a run of the hopper preset fine-tunes a Gaussian actor, and its preset line says why
    finetune(FinetuneConfig(dataset=TINY_PENDULUM, preset="hopper", offline_steps=20, output_dir=tmp_path / "finetune",
                            **FINETUNE))
    assert "actor gaussian (fine-tuning samples its policy; the preset's deterministic)" in capsys.readouterr().err
    actor, _ = load_actor(tmp_path / "finetune")
    with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
        observation = dataset_batch(64).select("observation")
        assert not torch.equal(actor(observation.clone())["action"], actor(observation.clone())["action"])  # it samples
    offline = load_checkpoint(deterministic_run["deterministic"].dir / CHECKPOINT_NAME)
    offline["config"].update(preset="hopper", actor="deterministic")  # as a hopper run of the default stores it
    adopted = adopt_offline_run(FinetuneConfig(checkpoint=deterministic_run["deterministic"].dir), offline, set())
    assert adopted.actor == "deterministic"  # which finetune() refuses, naming --actor gaussian

