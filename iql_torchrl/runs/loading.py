"""A run's data: built when it is a local builder's and missing, loaded into the replay buffer with the
run's transforms, fingerprinted and, for a resumed run, compared with the data it trained on; its
observations standardised (with the statistics a resumed run saved); then the evaluation environment
checked once, before any training."""
from __future__ import annotations

import sys
import warnings

from iql_torchrl.data import buffer_transitions, load_minari_dataset, normalize_stored_observations, unmet_requirements
from iql_torchrl.datasets import BUILDERS, dataset_exists, ensure_dataset
from iql_torchrl.runs.evaluation import check_evaluation_env, reference_scores_problem
from iql_torchrl.runs.resume import ResumeError, check_same_data, data_fingerprint

__all__ = ["load_run_data"]


def load_run_data(config, ctx, device, dataset: str, source: dict | None = None):
    """``(buffer, fingerprint)``: the dataset as the (resolved) ``config`` reads it, on ``device``.

    ``source``: the checkpoint of the run whose data this must be (a resumed run's own, or the offline run a
    fine-tuning starts from): its data's fingerprint must match, such a dataset is never rebuilt, and where it
    normalised observations its statistics are applied again, never recomputed. Under torchrun rank 0 builds and
    the other ranks wait.
    """
    fingerprint = (source or {}).get("data")
    if fingerprint is not None:
        if not dataset_exists(dataset):
            rebuild = (f", or build it again with the arguments it was built with (`python -m iql_torchrl.datasets "
                       f"build {dataset}`, with its --episodes and --seed if any): the run goes on if they hold the same "
                       "transitions, as a builder's do on any CPU (a MuJoCo set's with the same MuJoCo version, a -v0 "
                       "locomotion set's only on a CPU with the same vector instructions)" if dataset in BUILDERS else "")
            raise ResumeError(f"The dataset {dataset} of this run is missing; restore it{rebuild}. It is not built "
                              "here: data built otherwise would not be the data the run trained on.")
    elif dataset in BUILDERS:
        if ctx.is_main:
            ensure_dataset(dataset, progress=config.progress)
        ctx.barrier()  # the other ranks wait until rank 0 has built it
    buffer = load_minari_dataset(
        dataset, batch_size=config.batch_size, device=device,
        reward_transform=config.reward_transform, clip_actions=config.clip_actions,
        goal_in_observation=config.goal_in_observation(), success_terminal=config.success_terminal_option(),
    )
    own = data_fingerprint(dataset, buffer.metadata, buffer_transitions(buffer))
    if fingerprint is not None:
        note = check_same_data(fingerprint, own)
        if note is not None and ctx.is_main:
            print(f"iql_torchrl: {note}", file=sys.stderr)
    if config.normalize_observations == "yes":  # after the fingerprint: it holds the data's own statistics
        normalize_stored_observations(buffer, *saved_statistics(source))
    if ctx.is_main:
        unmet = unmet_requirements(dataset)
        if unmet:
            warnings.warn(f"{dataset} was made with other package versions than these: {', '.join(unmet)}. Its "
                          "episodes came from that simulator and the evaluations here run on this one, whose "
                          f"physics may differ; install those versions to evaluate as the data were collected.",
                          stacklevel=3)
        check_evaluation_env(buffer.metadata)
        problem = reference_scores_problem(buffer.metadata)
        if problem is not None:
            warnings.warn(f"No normalized scores for {dataset}: {problem}. Evaluations report raw returns.", stacklevel=3)
        size = buffer.metadata.num_transitions
        if config.batch_size > size:
            print(f"iql_torchrl: --batch-size {config.batch_size} is more than the {size:,} transitions of {dataset}: "
                  "batches draw with replacement, so each repeats transitions.", file=sys.stderr)
    return buffer, own


def saved_statistics(source: dict | None) -> tuple[list[float] | None, list[float] | None]:
    """``(mean, std)`` a checkpoint's run normalised its observations with; ``(None, None)`` where it did not."""
    metadata = (source or {}).get("metadata") or {}
    if not metadata.get("observations_normalized"):
        return None, None
    return metadata["observation_mean"], metadata["observation_std"]
