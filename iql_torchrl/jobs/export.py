"""Policies that run without the library: a run exported to torch.export or ONNX.

    python -m iql_torchrl.jobs.export RUN_DIR --format exported-program   # RUN_DIR/policy.pt2
    python -m iql_torchrl.jobs.export RUN_DIR --format onnx               # RUN_DIR/policy.onnx

The exported file is the run's deterministic evaluation policy as one function of a batch of raw
environment observations, float32 ``[N, obs_dim]`` (N dynamic; Dict observations flattened in the
order the sidecar lists), to environment actions: float32 ``[N, act_dim]`` in the environment's
units and bounds for Box actions, int64 ``[N]`` (the greedy action) for Discrete ones. The
observation normalisation, the mapping from the policy's action space to the environment's and the
evaluator's clipping to the bounds are inside the graph. Beside each file, ``<FILE>.json`` records
the environment, both spaces, the format, the versions and the run's final normalized score.

Load it with plain torch (``torch.export.load(path).module()``) or with onnxruntime
(``onnxruntime.InferenceSession(path)``, input ``"observation"``, output ``"action"``).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import warnings
from pathlib import Path

import torch
from tensordict import TensorDict
from torch import nn
from torchrl.envs.utils import ExplorationType, set_exploration_type

import iql_torchrl
from iql_torchrl.runs.checkpoint import CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME, CheckpointError, load_checkpoint
from iql_torchrl.jobs.cli import quiet_library_logs
from iql_torchrl.runs.run import SUMMARY_NAME
from iql_torchrl.runs.builders import load_actor
from iql_torchrl.runs.sweep import saved_member_seeds

__all__ = [
    "EnvironmentPolicy",
    "environment_policy",
    "export_policy",
    "write_policy",
    "policy_sidecar",
    "check_finished_run",
    "ExportArgumentError",
    "NotAFinishedRunError",
    "FORMATS",
    "main",
]

FORMATS = {"exported-program": ".pt2", "onnx": ".onnx"}
"""Export format → file suffix of the default output ``RUN_DIR/policy<suffix>``."""
INPUT_NAME, OUTPUT_NAME = "observation", "action"


class ExportArgumentError(ValueError):
    """An argument of the export names something that cannot be exported."""


class NotAFinishedRunError(ExportArgumentError):
    """The folder given to export is not a run that trained to its end."""


class EnvironmentPolicy(nn.Module):
    """A run's deterministic policy from raw (flattened) env observations to env actions.

    It does what the evaluator (:func:`iql_torchrl.runs.evaluation.evaluate_policy`) does around the
    actor, as tensor operations only: standardise the observation with the dataset's statistics (the
    evaluator's ``ObservationNorm``: its loc and scale, kept in the graph as buffers),
    take the actor's deterministic action, map it to the environment's bounds and clip it to them
    (Box), or take the greedy action index (Discrete).
    """

    def __init__(self, actor: nn.Module, metadata, observation_key="observation", action_key="action"):
        super().__init__()
        self.actor = actor
        self.metadata = metadata
        self.observation_key, self.action_key = observation_key, action_key
        self.discrete = metadata.discrete
        norm = metadata.observation_norm(in_keys=[observation_key])
        self.normalized = norm is not None
        if self.normalized:  # ObservationNorm's statistics; its forward branches on a tensor flag, which torch.export cannot trace
            self.register_buffer("observation_loc", norm.loc)
            self.register_buffer("observation_scale", norm.scale)
        if not self.discrete:
            self.register_buffer("action_low", torch.tensor(metadata.action_low, dtype=torch.float32))
            self.register_buffer("action_high", torch.tensor(metadata.action_high, dtype=torch.float32))

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        if self.normalized:  # ObservationNorm(standard_normal=True), as the evaluator applies it
            observation = (observation - self.observation_loc) / self.observation_scale
        td = TensorDict({self.observation_key: observation}, batch_size=observation.shape[:1])
        with set_exploration_type(ExplorationType.DETERMINISTIC):
            action = self.actor(td).get(self.action_key)
        action = self.metadata.action_to_env(action)  # Discrete: the index (also of a one-hot action)
        if self.discrete:
            return action.to(torch.int64)
        return torch.clamp(action, self.action_low, self.action_high)  # the evaluator's clip (a mean may leave the box)


# ---------------------------------------------------------------------------------------- runs
def check_finished_run(run_dir: str | Path) -> dict:
    """The summary of the finished run in ``run_dir``; a clear error for anything else."""
    run_dir = Path(run_dir)
    what = "a run folder (the --output-dir of examples/iql_offline.py or examples/iql_finetune.py)"
    if not run_dir.is_dir():
        raise NotAFinishedRunError(f"RUN_DIR {str(run_dir)!r} is not a folder: pass {what}.")
    if not (run_dir / CHECKPOINT_NAME).is_file():
        raise NotAFinishedRunError(f"RUN_DIR {str(run_dir)!r} holds no {CHECKPOINT_NAME}: it is not {what}.")
    if not (run_dir / SUMMARY_NAME).is_file():
        raise NotAFinishedRunError(
            f"RUN_DIR {str(run_dir)!r} is not a finished run (no {SUMMARY_NAME}): finish it with "
            f"--resume --output-dir {run_dir}, then export."
        )
    try:  # the final policy: never the older one that loading falls back to when the last is unreadable
        load_checkpoint(run_dir / CHECKPOINT_NAME, map_location="cpu")
    except CheckpointError as err:
        raise NotAFinishedRunError(
            f"{err} The export needs this final checkpoint ({PREVIOUS_CHECKPOINT_NAME} holds an older policy)."
        ) from err
    return json.loads((run_dir / SUMMARY_NAME).read_text())


def environment_policy(run_dir: str | Path, seed_index: int = 0) -> tuple[EnvironmentPolicy, dict]:
    """The exportable policy of a finished run (seed ``seed_index`` of a ``--num-seeds`` run) and its summary."""
    summary = check_finished_run(run_dir)
    members = len(saved_member_seeds(summary))
    if not 0 <= seed_index < members:
        raise ExportArgumentError(
            f"--seed-index must be in [0, {members}) for this run of {members} member(s), got {seed_index}."
        )
    actor, metadata = load_actor(run_dir, device="cpu", seed_index=seed_index)
    return EnvironmentPolicy(actor, metadata).eval(), summary


# ---------------------------------------------------------------------------------------- export
def export_policy(
    run_dir: str | Path, format: str = "exported-program", output: str | Path | None = None, seed_index: int = 0
) -> Path:
    """Writes the run's policy in ``format`` to ``output`` (default ``RUN_DIR/policy.pt2|.onnx``, and
    ``policy-seedK.pt2|.onnx`` for seed K of a ``--num-seeds`` run) and its sidecar ``<output>.json``;
    returns the policy file's path."""
    _check_format(format)
    policy, summary = environment_policy(run_dir, seed_index)
    if output is None:
        seed = (f"-member{seed_index}" if summary.get("sweep") else
                f"-seed{seed_index}" if summary.get("num_seeds", 1) > 1 else "")
        output = Path(run_dir) / f"policy{seed}{FORMATS[format]}"
    output = Path(output)
    extra = write_policy(policy, format, output)
    sidecar = policy_sidecar(policy, summary, format=format, file=output.name, seed_index=seed_index)
    Path(f"{output}.json").write_text(json.dumps({**sidecar, **extra}, indent=2))
    return output


def write_policy(policy: EnvironmentPolicy, format: str, path: str | Path) -> dict:
    """Exports ``policy`` with a dynamic batch dimension to ``path``; returns format details for the sidecar."""
    _check_format(format)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    policy = copy.deepcopy(policy).eval().requires_grad_(False)  # actions come out as plain tensors, ready for .numpy()
    example = torch.zeros(2, policy.metadata.observation_dim)  # two rows: a batch of one would fix N to 1
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},)
    if format == "exported-program":
        program = torch.export.export(policy, (example,), dynamic_shapes=dynamic_shapes, strict=False)
        torch.export.save(program, path)
        return {}
    with _without_exporter_notices():
        onnx_program = torch.onnx.export(
            policy, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=dynamic_shapes, external_data=False, verbose=False,
        )
    onnx_program.save(path, external_data=False)  # one self-contained file
    return {"onnx_opset": next(o.version for o in onnx_program.model_proto.opset_import if o.domain == "")}


class _NotTorchvision(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("torchvision is not installed")


@contextlib.contextmanager
def _without_exporter_notices():
    """Leaves out, while exporting only, two notices torch.onnx prints about torch itself and not the policy:
    that it skips torchvision's ops where torchvision is not installed (a policy has none), and torch's
    own deprecation of ``LeafSpec``. Every other log line and warning of the exporter comes through."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    not_torchvision = _NotTorchvision()
    registration.addFilter(not_torchvision)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                    category=FutureWarning)
            yield
    finally:
        registration.removeFilter(not_torchvision)


def policy_sidecar(policy: EnvironmentPolicy, summary: dict, *, format: str, file: str, seed_index: int) -> dict:
    """What a user of the exported file needs: environment, spaces, input/output, versions, setting, score."""
    from minari.serialization import serialize_space

    metadata = policy.metadata
    env = metadata.make_env()
    try:
        observation_space = json.loads(serialize_space(env.observation_space))
        action_space = json.loads(serialize_space(env.action_space))
    finally:
        env.close()
    per_seed = summary.get("per_seed") or []
    score_of = per_seed[seed_index] if len(per_seed) > seed_index else summary
    action_shape = ["N"] if policy.discrete else ["N", metadata.action_dim]
    return {
        "format": format,
        "file": file,
        "env_id": metadata.env_id,
        "env_spec": metadata.env_spec_json,
        "dataset": metadata.dataset_id,
        "observation_space": observation_space,
        "observation_keys": metadata.observation_keys,
        "action_space": action_space,
        "input": {"name": INPUT_NAME, "dtype": "float32", "shape": ["N", metadata.observation_dim]},
        "output": {"name": OUTPUT_NAME, "dtype": "int64" if policy.discrete else "float32", "shape": action_shape},
        "seed": saved_member_seeds(summary)[seed_index],
        "seed_index": seed_index,
        # the IQL setting this policy trained with: a --sweep member's own, else the run's
        "temperature": score_of.get("temperature", summary.get("temperature")),
        "expectile": score_of.get("expectile", summary.get("expectile")),
        "normalized_score": score_of.get("normalized_score"),
        "return_mean": score_of.get("return_mean"),
        "versions": {"iql_torchrl": iql_torchrl.__version__, "torch": torch.__version__},
    }


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise ExportArgumentError(f"--format must be one of {sorted(FORMATS)}, got {format!r}.")
    if format != "onnx":
        return
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"--format onnx needs onnx and onnxscript ({err.name} is missing): pip install 'iql_torchrl[export]'."
        ) from err


# ---------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> Path:
    quiet_library_logs()
    parser = argparse.ArgumentParser(prog="python -m iql_torchrl.jobs.export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a finished run folder (holding checkpoint.pt and summary.json)")
    parser.add_argument("--format", choices=sorted(FORMATS), default="exported-program",
                        help="exported-program (torch.export, .pt2) or onnx (default exported-program)")
    parser.add_argument("--output", type=Path, default=None,
                        help="policy file (default RUN_DIR/policy.pt2 or .onnx; policy-seedK.* for a --num-seeds run)")
    parser.add_argument("--seed-index", type=int, default=0,
                        help="which member of a --num-seeds or --sweep run (default 0; setting-major, as its summary lists them)")
    args = parser.parse_args(argv)
    try:
        path = export_policy(args.run_dir, args.format, args.output, args.seed_index)
    except (ExportArgumentError, ImportError) as err:
        parser.exit(2, f"error: {err}\n")
    print(f"wrote {path} and {path}.json")
    return path


if __name__ == "__main__":
    main()
