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
from test_normalization import TINY, exported_returns


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
    assert not any(empty_root.iterdir())  # the set was not built


def test_fine_tuning_refuses_a_deterministic_actor_given_or_from_its_offline_run(deterministic_run, tiny_datasets,
                                                                                 tmp_path):
    with pytest.raises(ConfigError, match="--actor deterministic: fine-tuning explores by sampling the policy"):
        FinetuneConfig(dataset=TINY_PENDULUM, actor="deterministic").check()
    run = deterministic_run["deterministic"]
    config = FinetuneConfig(checkpoint=run.dir, output_dir=tmp_path / "finetune", online_steps=32, num_envs=2,
                            frames_per_batch=16, hidden_sizes=(16, 16), device="cpu", progress=False, logger="none")
    config.check()
    with pytest.raises(ConfigError, match=f"--checkpoint {run.dir} trained a deterministic actor"):
        finetune(config)
    assert load_checkpoint(run.dir / CHECKPOINT_NAME)["config"]["actor"] == "deterministic"


def test_fine_tuning_a_gaussian_run_takes_its_actor_whether_or_not_given(deterministic_run, tiny_datasets):
    gaussian = deterministic_run["gaussian"]  # trained with --actor gaussian: the same actor as auto's
    auto_run = load_checkpoint(gaussian.dir / CHECKPOINT_NAME)
    auto_run["config"]["actor"] = "auto"  # as a run of the default stores it
    for given in ("auto", "gaussian"):
        config = adopt_offline_run(FinetuneConfig(checkpoint=gaussian.dir, actor=given), auto_run, {"actor"})
        assert config.actor == "auto"
    deterministic = load_checkpoint(deterministic_run["deterministic"].dir / CHECKPOINT_NAME)
    with pytest.raises(ConfigError, match="--actor: the offline run's deterministic, given gaussian"):
        adopt_offline_run(FinetuneConfig(checkpoint=gaussian.dir, actor="gaussian"), deterministic, {"actor"})


def test_the_preset_line_names_a_deterministic_actor_and_nothing_for_the_paper_s():
    line = describe_preset("mujoco", "why", OfflineConfig(actor="deterministic", preset="mujoco"))
    assert line == ("preset mujoco (expectile 0.7, temperature 3.0, reward transform locomotion, "
                    "a deterministic actor (--actor)): why")
    assert "actor" not in describe_preset("mujoco", "why", OfflineConfig(actor="gaussian", preset="mujoco"))
