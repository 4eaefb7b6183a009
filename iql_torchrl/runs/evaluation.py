"""Deterministic rollouts of a policy in the dataset's environment, and normalized scores.

The policy acts in the buffer's action space ([−1, 1] when the loader scaled actions) on
observations prepared the way the dataset was: flattened, and standardised by the data's TorchRL
``ObservationNorm`` (:meth:`~iql_torchrl.data.OfflineDataMetadata.observation_norm`) if it was;
``metadata.action_to_env`` maps its actions back to the environment's bounds. Episodes run in
parallel in a gymnasium ``SyncVectorEnv``: one batched policy call per step for all of them.

Goal-reaching environments (those whose ``info`` carries ``"success"``, e.g. PointMaze and AntMaze)
also report the success rate: the share of episodes with ``info["success"]`` at any of their steps.
"""
from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from tensordict import TensorDict
from torchrl.envs.utils import ExplorationType, set_exploration_type

from iql_torchrl.data.metadata import check_observation_layout

__all__ = ["evaluate_policy", "evaluate_seeds", "evaluation_seed", "reference_scores_problem", "check_evaluation_env",
           "summarize_seeds", "EvaluationEnvError"]


class EvaluationEnvError(RuntimeError):
    """The dataset's evaluation environment cannot be created or reset here."""


def reference_scores_problem(metadata) -> str | None:
    """Why normalized scores cannot be computed for this dataset (``None`` when they can).

    They need the random and expert reference returns, finite and distinct.
    """
    low, high = metadata.ref_min_score, metadata.ref_max_score
    if low is None or high is None:
        return "the dataset has no reference scores (ref_min_score / ref_max_score)"
    if not (np.isfinite(low) and np.isfinite(high)):
        return f"its reference scores are not finite (ref_min_score {low}, ref_max_score {high})"
    if low == high:
        return f"its reference scores are equal (ref_min_score = ref_max_score = {low})"
    return None


def check_evaluation_env(metadata) -> None:
    """Creates and resets the evaluation environment once; :class:`EvaluationEnvError` says why it cannot run,
    a :class:`~iql_torchrl.data.DatasetError` names an observation entry it lacks or shapes differently from the data."""
    name = metadata.env_id or "(unknown)"
    if metadata.env_id is None and metadata.env_spec_json is None:
        raise EvaluationEnvError(
            f"Dataset {metadata.dataset_id} records no environment, so its policies cannot be evaluated: record one "
            "with the data (minari.create_dataset_from_buffers(..., env=..., eval_env=...)), or train on it from Python "
            "with IQLLoss and IQLUpdate (docs/data.md)."
        )
    try:
        env = metadata.make_env()
        try:
            observation, _ = env.reset(seed=0)
            time_limit = env.spec.max_episode_steps if env.spec is not None else None
        finally:
            env.close()
    except Exception as err:
        raise EvaluationEnvError(
            f"The evaluation environment {name} of dataset {metadata.dataset_id} cannot be created and reset: "
            f"{type(err).__name__}: {str(err).rstrip('.')}. Install what it needs (e.g. gymnasium[mujoco]) or use "
            "another --dataset."
        ) from err
    if time_limit is None:
        raise EvaluationEnvError(
            f"The evaluation environment {name} of dataset {metadata.dataset_id} has no time limit "
            "(max_episode_steps): an evaluation episode that the policy never ends would never return. Record the "
            "dataset with an eval_env that has one (minari.create_dataset_from_buffers(..., "
            "eval_env=gym.make(id, max_episode_steps=N)))."
        )
    check_observation_layout(observation, metadata.observation_keys, metadata.observation_key_shapes,
                             f"The evaluation environment {name} of dataset {metadata.dataset_id}")


@torch.no_grad()
def evaluate_policy(
    actor,
    metadata,
    *,
    episodes: int = 10,
    seed: int = 0,
    device: torch.device | str = "cpu",
    observation_key="observation",
    action_key="action",
) -> dict:
    """Runs ``episodes`` deterministic episodes at once; returns their returns and scores.

    Returns a dict with ``returns`` (one per episode), ``return_mean``, ``return_std``
    (population), ``normalized_score`` (100 × ``minari.get_normalized_score`` of the mean
    return: 0 is the random policy, 100 the expert; unclamped) and ``normalized_scores`` per
    episode -- the two scores only when :func:`reference_scores_problem` finds the references
    usable. Environments whose ``info`` carries ``"success"`` add ``successes``, ``success_rate`` and
    ``steps_to_goal`` (per episode, the step that first reached the goal, counting from 1; ``None`` where
    none did). Episode ``i`` resets with seed ``seed + i``, so a given seed is reproducible.
    """
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}.")
    norm = metadata.observation_norm(in_keys=[observation_key])  # the data's standardisation, if it had one
    norm = norm.to(device) if norm is not None else (lambda td: td)
    envs = gym.vector.SyncVectorEnv([metadata.make_env for _ in range(episodes)])
    try:
        observation, _ = envs.reset(seed=[seed + i for i in range(episodes)])
        returns = np.zeros(episodes)
        running = np.ones(episodes, dtype=bool)
        succeeded, reports_success = np.zeros(episodes, dtype=bool), False
        steps_to_goal, step = np.full(episodes, -1), 0
        with set_exploration_type(ExplorationType.DETERMINISTIC):
            while running.any():
                step += 1
                obs = torch.as_tensor(metadata.flatten_observation(observation), device=device)
                td = norm(TensorDict({observation_key: obs}, batch_size=[episodes], device=device))
                env_action = metadata.action_to_env(actor(td).get(action_key)).cpu().numpy()
                if np.issubdtype(env_action.dtype, np.floating):  # a Gaussian policy's mean may leave the box
                    env_action = np.clip(env_action, metadata.action_low, metadata.action_high)
                observation, reward, terminated, truncated, info = envs.step(env_action)
                returns += np.where(running, reward, 0.0)
                if "success" in info:
                    reports_success = True
                    now = running & info.get("_success", True) & np.asarray(info["success"], dtype=bool)
                    steps_to_goal[now & ~succeeded] = step
                    succeeded |= now
                # each env counts its first episode only (the vector env auto-resets after it)
                running &= ~(terminated | truncated)
    finally:
        envs.close()
    return_mean = float(returns.mean())
    result = {
        "returns": returns.tolist(),
        "return_mean": return_mean,
        "return_std": float(returns.std()),
    }
    if reports_success:
        result["successes"] = succeeded.tolist()
        result["success_rate"] = float(succeeded.mean())
        result["steps_to_goal"] = [int(n) if n > 0 else None for n in steps_to_goal]
    if reference_scores_problem(metadata) is None:
        result["normalized_score"] = float(metadata.normalized_score(return_mean))
        result["normalized_scores"] = [float(metadata.normalized_score(r)) for r in returns]
    return result


def summarize_seeds(results: list[dict]) -> dict:
    """Mean over seeds of per-seed :func:`evaluate_policy` results (each with its ``"seed"``), with each seed's own figures.

    ``normalized_score`` is ``None`` when the references were unusable, ``success_rate`` when the
    environment reports no success.
    """
    import statistics

    scores = [r.get("normalized_score") for r in results]
    has_scores = all(s is not None for s in scores)
    returns = [x for r in results for x in r["returns"]]
    rates = [r.get("success_rate") for r in results]
    has_rates = all(rate is not None for rate in rates)
    return {
        "success_rate": statistics.fmean(rates) if has_rates else None,
        "normalized_score": statistics.fmean(scores) if has_scores else None,
        "normalized_score_std": statistics.pstdev(scores) if has_scores else None,
        "return_mean": statistics.fmean(r["return_mean"] for r in results),
        "return_std": statistics.pstdev(returns),
        "per_seed": [
            {"seed": r["seed"], "normalized_score": r.get("normalized_score"), "return_mean": r["return_mean"],
             **({"success_rate": r["success_rate"]} if has_rates else {})}
            for r in results
        ],
    }


def evaluation_seed(seed: int) -> int:
    """The environment seed of the first evaluation episode of a run trained with ``seed`` (kept apart
    from the seeds that drew its networks and batches)."""
    return seed + 10_000


def evaluate_seeds(loss, seeds: list[int], metadata, episodes: int, device) -> dict:
    """Deterministic episodes of each seed's policy (``loss``: one seed's IQLLoss, or a SeedEnsemble of
    ``len(seeds)``), summarised by :func:`summarize_seeds`; seed ``s`` evaluates on env seeds from
    :func:`evaluation_seed` ``(s)``."""
    results = []
    for k, seed in enumerate(seeds):
        seed_loss = loss if len(seeds) == 1 else loss.seed_loss(k)
        actor = seed_loss.get_stateful_net("actor_network", copy=True).eval()
        results.append({"seed": seed, **evaluate_policy(actor, metadata, episodes=episodes, seed=evaluation_seed(seed),
                                                        device=device)})
    return summarize_seeds(results)
