"""Exported policies: a finished run as a torch.export or ONNX file that acts like the evaluator,
loaded in a process that never imports iql_torchrl."""
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch
from tensordict.nn import TensorDictModule

from iql_torchrl.runs.checkpoint import CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME
from iql_torchrl.runs.evaluation import evaluate_policy
from iql_torchrl.jobs.export import EnvironmentPolicy, NotAFinishedRunError, export_policy, main, write_policy
from iql_torchrl.jobs.finetune import FinetuneConfig, finetune
from iql_torchrl.objectives.networks import make_actor
from iql_torchrl.runs.builders import load_actor
from iql_offline import train
from iql_torchrl.runs.config import OfflineConfig

from conftest import TINY_PENDULUM

TINY = dict(
    steps=20, batch_size=32, eval_every=20, eval_episodes=2, log_every=10, checkpoint_every=20,
    hidden_sizes=(16, 16), device="cpu", progress=False, logger="none",
)
EPISODE_SEEDS = [7, 8]
OBSERVATIONS_SEED = 123

# Run in a fresh interpreter: loads each exported file the way a user without the library would.
STANDALONE = r'''
import json, sys

class RefuseTheLibrary:  # any import of iql_torchrl fails loudly
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "iql_torchrl":
            raise ImportError("an exported policy must not need iql_torchrl")
sys.meta_path.insert(0, RefuseTheLibrary())

import gymnasium as gym
import numpy as np
import onnxruntime
import torch

def load(path):
    if path.endswith(".onnx"):
        session = onnxruntime.InferenceSession(path)
        return lambda obs: session.run(["action"], {"observation": obs})[0]
    module = torch.export.load(path).module()
    return lambda obs: module(torch.from_numpy(obs)).numpy()

def episode_return(policy, meta, seed):
    env = gym.make(gym.envs.registration.EnvSpec.from_json(meta["env_spec"]))
    obs, _ = env.reset(seed=seed)
    total, done = 0.0, False
    while not done:
        action = policy(np.asarray(obs, dtype=np.float32).reshape(1, -1))[0]
        obs, reward, terminated, truncated, _ = env.step(action)
        total, done = total + float(reward), terminated or truncated
    return total

args = json.loads(sys.argv[1])
observations = np.load(args["observations"])
out = {}
for path in args["policies"]:
    meta = json.loads(open(path + ".json").read())
    policy = load(path)
    actions = policy(observations)
    out[path] = {"actions": actions.tolist(), "dtype": str(actions.dtype), "shape": list(actions.shape),
                 "one_row": policy(observations[:1]).tolist(),
                 "returns": [episode_return(policy, meta, s) for s in args["seeds"]]}
out["imported"] = sorted(m for m in sys.modules if m.split(".")[0] in ("iql_torchrl", "torchrl", "tensordict"))
json.dump(out, open(args["result"], "w"))
'''


# ------------------------------------------------------------------ the evaluator, recorded
class _RecordingEnv(gym.Wrapper):
    """Records each (observation, action) pair the evaluator's environment sees."""

    def __init__(self, env, steps):
        super().__init__(env)
        self.steps = steps

    def reset(self, **kwargs):
        self._observation, info = self.env.reset(**kwargs)
        return self._observation, info

    def step(self, action):
        self.steps.append((np.asarray(self._observation, dtype=np.float32), np.array(action)))
        self._observation, *rest = self.env.step(action)
        return (self._observation, *rest)


class _RecordingMetadata:
    """The run's metadata, whose environments record what the evaluator feeds them."""

    def __init__(self, metadata):
        self._metadata, self.steps = metadata, []

    def __getattr__(self, name):
        return getattr(self._metadata, name)

    def make_env(self, **kwargs):
        return _RecordingEnv(self._metadata.make_env(**kwargs), self.steps)


def evaluator_steps(run_dir, seed=OBSERVATIONS_SEED, n=100, seed_index=0, episodes=1):
    """The first ``n`` raw observations of the library's evaluation episodes and the env actions it took."""
    actor, metadata = load_actor(run_dir, seed_index=seed_index)
    recording = _RecordingMetadata(metadata)
    evaluate_policy(actor, recording, episodes=episodes, seed=seed)
    observations, actions = map(np.stack, zip(*recording.steps[:n]))
    assert len(observations) == n
    return observations, actions


# ------------------------------------------------------------------ one run, exported both ways
@pytest.fixture(scope="module")
def run(tiny_datasets_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MINARI_DATASETS_PATH", str(tiny_datasets_root))
        train(OfflineConfig(dataset=TINY_PENDULUM, output_dir=out, normalize_observations=True, **TINY))
    onnx_path = main([str(out), "--format", "onnx"])
    program_path = main([str(out), "--format", "exported-program"])
    observations, actions = evaluator_steps(out)
    return SimpleNamespace(dir=out, onnx=onnx_path, program=program_path, observations=observations, actions=actions)


def run_standalone(policies, observations, work):
    """What the exported files do in a fresh process that cannot import iql_torchrl: their actions on
    ``observations`` and their returns over episodes reset with ``EPISODE_SEEDS``."""
    np.save(work / "observations.npy", observations)
    args = {"observations": str(work / "observations.npy"), "policies": [str(p) for p in policies],
            "seeds": EPISODE_SEEDS, "result": str(work / "result.json")}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", STANDALONE, json.dumps(args)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((work / "result.json").read_text())


@pytest.fixture(scope="module")
def standalone(run, tmp_path_factory):
    return run_standalone([run.onnx, run.program], run.observations, tmp_path_factory.mktemp("standalone"))


def test_the_default_outputs_are_policy_files_in_the_run_folder_with_sidecars(run):
    assert run.onnx == run.dir / "policy.onnx" and run.program == run.dir / "policy.pt2"
    for path in (run.onnx, run.program):
        assert path.stat().st_size > 1000 and Path(f"{path}.json").is_file()
    assert not list(run.dir.glob("*.data"))  # the ONNX weights live inside the one file


def test_both_formats_load_without_the_library_in_a_fresh_process(run, standalone):
    assert standalone["imported"] == []  # not iql_torchrl, and not torchrl or tensordict either
    for path in (run.onnx, run.program):
        result = standalone[str(path)]
        assert result["dtype"] == "float32" and result["shape"] == [100, 1], path
        assert np.array(result["one_row"]).shape == (1, 1)  # the batch dimension is dynamic


def test_exported_actions_are_the_evaluators_on_100_observations(run, standalone):
    for path in (run.onnx, run.program):
        exported = np.array(standalone[str(path)]["actions"], dtype=np.float64)
        assert np.abs(exported - run.actions).max() <= 1e-5, path
    # the check can fail: the policy without the observation normalisation, or without the
    # mapping to Pendulum's ±2 torque bounds, acts differently
    actor, metadata = load_actor(run.dir)
    assert metadata.observations_normalized and metadata.actions_scaled
    policy = EnvironmentPolicy(actor, metadata).eval()
    with torch.no_grad():
        raw_in = policy(metadata.unnormalize_observation(torch.from_numpy(run.observations)))  # the actor on raw ones
        unmapped = metadata.action_from_env(policy(torch.from_numpy(run.observations)))
    assert np.abs(raw_in.double().numpy() - run.actions).max() > 1e-3
    assert np.abs(unmapped.double().numpy() - run.actions).max() > 1e-3


def test_an_episode_with_the_exported_policy_returns_what_the_evaluator_returns(run, standalone):
    actor, metadata = load_actor(run.dir)
    expected = evaluate_policy(actor, metadata, episodes=len(EPISODE_SEEDS), seed=EPISODE_SEEDS[0])["returns"]
    assert len(set(expected)) == len(expected)  # different reset seeds, different episodes
    for path in (run.onnx, run.program):
        np.testing.assert_allclose(standalone[str(path)]["returns"], expected, rtol=1e-6, err_msg=str(path))


def test_the_sidecar_names_the_environment_spaces_format_versions_and_score(run):
    summary = json.loads((run.dir / "summary.json").read_text())
    for path, format in ((run.onnx, "onnx"), (run.program, "exported-program")):
        meta = json.loads(Path(f"{path}.json").read_text())
        assert meta["format"] == format and meta["file"] == path.name
        assert meta["env_id"] == "Pendulum-v1" and gym.envs.registration.EnvSpec.from_json(meta["env_spec"]).id == "Pendulum-v1"
        assert meta["observation_space"] == {"type": "Box", "dtype": "float32", "shape": [3],
                                             "low": [-1.0, -1.0, -8.0], "high": [1.0, 1.0, 8.0]}
        assert meta["observation_keys"] is None
        assert meta["action_space"] == {"type": "Box", "dtype": "float32", "shape": [1], "low": [-2.0], "high": [2.0]}
        assert meta["input"] == {"name": "observation", "dtype": "float32", "shape": ["N", 3]}
        assert meta["output"] == {"name": "action", "dtype": "float32", "shape": ["N", 1]}
        assert meta["versions"]["torch"] == torch.__version__ and meta["versions"]["iql_torchrl"] == summary["version"]
        assert meta["normalized_score"] == summary["normalized_score"] and meta["seed"] == 0
        assert (meta["temperature"], meta["expectile"]) == (3.0, 0.7)  # the preset's, as the run trained them
    assert json.loads(Path(f"{run.onnx}.json").read_text())["onnx_opset"] >= 18


def test_the_export_command_prints_what_it_wrote_and_nothing_about_torch_itself(run, tmp_path):
    # torch.onnx logs the torchvision ops it skips and warns of its own LeafSpec deprecation: not the user's concern
    out = tmp_path / "quiet.onnx"
    done = subprocess.run([sys.executable, "-m", "iql_torchrl.jobs.export", str(run.dir), "--format", "onnx",
                           "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (done.stdout + done.stderr).strip() == f"wrote {out} and {out}.json"
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    assert not logger.filters  # the exporter's log is left as it was found


# ------------------------------------------------------------------ what cannot be exported
def test_a_folder_that_is_not_a_finished_run_is_refused_before_any_work(run, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(run.dir / CHECKPOINT_NAME, unfinished / CHECKPOINT_NAME)  # a run stopped before its end
    (tmp_path / "empty").mkdir()
    torn = tmp_path / "torn"  # finished, but its last checkpoint is unreadable: the previous one is older
    torn.mkdir()
    shutil.copy(run.dir / "summary.json", torn / "summary.json")
    shutil.copy(run.dir / CHECKPOINT_NAME, torn / PREVIOUS_CHECKPOINT_NAME)
    (torn / CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    cases = {tmp_path / "missing": "is not a folder", tmp_path / "empty": f"holds no {CHECKPOINT_NAME}",
             unfinished: "is not a finished run", torn: "needs this final checkpoint"}
    for folder, message in cases.items():
        with pytest.raises(NotAFinishedRunError, match=message):
            export_policy(folder, "onnx")
        with pytest.raises(SystemExit):
            main([str(folder)])
        assert message in capsys.readouterr().err
    assert sorted(p.name for p in unfinished.iterdir()) == [CHECKPOINT_NAME]  # nothing written
    with pytest.raises(SystemExit):
        main([str(run.dir), "--seed-index", "1", "--output", str(tmp_path / "p.pt2")])
    assert "--seed-index must be in [0, 1)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(run.dir), "--format", "torchscript"])
    assert not (tmp_path / "p.pt2").exists()


def test_the_evaluators_clip_to_the_bounds_is_inside_the_exported_graph(run, tmp_path):
    # a hand-made policy: unscaled actions 3·x on bounds [-0.5, 0.5] × [1, 2] (the mean leaves the box)
    _, metadata = load_actor(run.dir)
    metadata = dataclasses.replace(
        metadata, observation_dim=2, action_dim=2, actions_scaled=False, action_low=[-0.5, 1.0], action_high=[0.5, 2.0],
        observations_normalized=True, observation_mean=[1.0, -1.0], observation_std=[2.0, 4.0],
    )
    actor = TensorDictModule(lambda obs: 3.0 * obs, in_keys=["observation"], out_keys=["action"])
    write_policy(EnvironmentPolicy(actor, metadata), "exported-program", tmp_path / "clip.pt2")
    write_policy(EnvironmentPolicy(actor, metadata), "onnx", tmp_path / "clip.onnx")
    observations = np.array([[1.0, -1.0], [1.2, 4.0], [-3.0, 11.0], [1.3, -9.0]], dtype=np.float32)
    # normalised: (0, 0), (0.1, 1.25), (-2, 3), (0.15, -2); times 3, clipped to the bounds, by hand
    expected = np.array([[0.0, 1.0], [0.3, 2.0], [-0.5, 2.0], [0.45, 1.0]])
    program = torch.export.load(tmp_path / "clip.pt2").module()
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "clip.onnx"))
    for got in (program(torch.from_numpy(observations)).numpy(), session.run(["action"], {"observation": observations})[0]):
        np.testing.assert_allclose(got, expected, atol=1e-6)


# ------------------------------------------------------------------ several seeds, fine-tuning
def test_seed_index_exports_one_seed_of_a_num_seeds_run(tiny_datasets, tmp_path):
    out = tmp_path / "k2"
    summary = train(OfflineConfig(dataset=tiny_datasets.pendulum, output_dir=out, num_seeds=2, **TINY))
    path = main([str(out), "--seed-index", "1", "--output", str(tmp_path / "seed1.pt2")])
    meta = json.loads(Path(f"{path}.json").read_text())
    assert meta["seed"] == 1 and meta["seed_index"] == 1
    assert meta["normalized_score"] == summary["per_seed"][1]["normalized_score"]
    program = torch.export.load(path).module()
    for k, matches in ((1, True), (0, False)):
        observations, actions = evaluator_steps(out, seed_index=k)
        exported = program(torch.from_numpy(observations)).double().numpy()
        assert (np.abs(exported - actions).max() <= 1e-5) == matches, k
    with pytest.raises(SystemExit):
        main([str(out), "--seed-index", "2"])
    # by default each seed has a file of its own: exporting one never overwrites another's
    defaults = [main([str(out), "--seed-index", str(k)]) for k in (0, 1)]
    assert defaults == [out / "policy-seed0.pt2", out / "policy-seed1.pt2"]
    assert [json.loads(Path(f"{p}.json").read_text())["seed_index"] for p in defaults] == [0, 1]


def test_a_fine_tuned_run_exports_and_acts_like_its_evaluator(tiny_datasets, tmp_path):
    import onnxruntime

    out = tmp_path / "finetuned"
    finetune(FinetuneConfig(
        dataset=tiny_datasets.pendulum, output_dir=out, offline_steps=10, online_steps=32, num_envs=2,
        frames_per_batch=16, batch_size=32, eval_every=100, eval_episodes=1, checkpoint_every=100,
        hidden_sizes=(16, 16), device="cpu", progress=False, logger="none",
    ))
    path = export_policy(out, "onnx")
    observations, actions = evaluator_steps(out)
    session = onnxruntime.InferenceSession(str(path))
    exported = session.run(["action"], {"observation": observations})[0].astype(np.float64)
    assert np.abs(exported - actions).max() <= 1e-5
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads(Path(f"{path}.json").read_text())["normalized_score"] == summary["normalized_score"]


# ------------------------------------------------------------------ discrete actions
@pytest.mark.parametrize("one_hot", [False, True])
def test_a_discrete_policy_exports_its_greedy_action_index(run, tmp_path, one_hot):
    import onnxruntime

    _, metadata = load_actor(run.dir)
    if "action_space" not in {f.name for f in dataclasses.fields(metadata)}:
        pytest.skip("the data metadata records no action space yet (no discrete runs)")
    metadata = dataclasses.replace(
        metadata, observation_dim=3, action_dim=4, action_low=[], action_high=[], actions_scaled=False,
        observations_normalized=False, action_space="discrete", num_actions=4, one_hot_actions=one_hot,
    )
    torch.manual_seed(0)
    actor = make_actor(3, 4, kind="one_hot" if one_hot else "categorical", hidden_sizes=(8,))
    write_policy(EnvironmentPolicy(actor, metadata), "exported-program", tmp_path / "greedy.pt2")
    write_policy(EnvironmentPolicy(actor, metadata), "onnx", tmp_path / "greedy.onnx")
    observations = np.random.default_rng(0).normal(size=(100, 3)).astype(np.float32)
    # the greedy action by hand: argmax of the logits, computed in float64 from the actor's weights
    (w1, b1), (w2, b2) = [(layer.weight.detach().double().numpy(), layer.bias.detach().double().numpy())
                          for layer in actor.modules() if isinstance(layer, torch.nn.Linear)]
    logits = np.maximum(observations @ w1.T + b1, 0.0) @ w2.T + b2
    expected = logits.argmax(-1)
    assert len(set(expected.tolist())) > 1  # the observations reach several actions
    program = torch.export.load(tmp_path / "greedy.pt2").module()
    session = onnxruntime.InferenceSession(str(tmp_path / "greedy.onnx"))
    for got in (program(torch.from_numpy(observations)).numpy(), session.run(["action"], {"observation": observations})[0]):
        assert got.dtype == np.int64 and got.shape == (100,)
        np.testing.assert_array_equal(got, expected)


CARTPOLE = "iql_torchrl/cartpole/mixed-v0"


def test_a_discrete_run_exports_the_evaluators_greedy_actions(tmp_path):
    from iql_torchrl.datasets import BUILDERS, build_dataset

    if CARTPOLE not in BUILDERS:
        pytest.skip("no discrete datasets yet")
    out = tmp_path / "cartpole"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
        build_dataset(CARTPOLE, episodes=5, reference_episodes=2, progress=False)
        train(OfflineConfig(dataset=CARTPOLE, output_dir=out, seed=2, **TINY))  # seed 2: a policy that uses both actions
    paths = [export_policy(out, "onnx"), export_policy(out, "exported-program")]
    observations, actions = evaluator_steps(out, episodes=30)  # CartPole episodes can be short
    assert actions.dtype == np.int64 and set(actions.tolist()) == {0, 1}  # the comparison can fail
    standalone = run_standalone(paths, observations, tmp_path)
    assert standalone["imported"] == []
    actor, metadata = load_actor(out)
    expected_returns = evaluate_policy(actor, metadata, episodes=len(EPISODE_SEEDS), seed=EPISODE_SEEDS[0])["returns"]
    for path in paths:
        result = standalone[str(path)]
        assert result["dtype"] == "int64" and result["shape"] == [100], path
        np.testing.assert_array_equal(result["actions"], actions)
        assert result["returns"] == expected_returns, path
        meta = json.loads(Path(f"{path}.json").read_text())
        assert meta["output"] == {"name": "action", "dtype": "int64", "shape": ["N"]}
        assert meta["action_space"] == {"type": "Discrete", "dtype": "int64", "start": 0, "n": 2}
