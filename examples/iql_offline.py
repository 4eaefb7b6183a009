"""Offline IQL on a Minari dataset: the main job.

    python examples/iql_offline.py                      # the embedded default: a mixed Pendulum dataset
    python examples/iql_offline.py --temperature 0      # behaviour cloning on the same data
    python examples/iql_offline.py --dataset mujoco/hopper/medium-v0 --steps 1000000
    python examples/iql_offline.py --num-seeds 4       # 4 seeds at once, vmapped in one process
    python examples/iql_offline.py --resume --output-dir runs/<run>   # continue a stopped run
    torchrun --nproc_per_node 2 examples/iql_offline.py  # data-parallel: 2 processes, batch 256 each
    python examples/iql_offline.py --help

Reads like the algorithm: configuration (iql_torchrl.trainer.Config) → Minari data in a TorchRL
replay buffer → the paper's networks → IQLLoss → the fused update step → the loop → evaluation →
summary. The full summary is written to the run folder's summary.json; the console gets a short one.
(``iql_torchrl.trainer.train`` runs the same steps, for use from Python.)
"""
import os

# before torch loads: idle OpenMP threads spin briefly, then sleep -- as fast alone as threads that
# spin, and two runs side by side don't starve each other (iql_torchrl.threads); a user's own setting wins
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import sys  # noqa: E402

from iql_torchrl.build import batch_generators, build_seed_losses, index_sampler, make_update  # noqa: E402
from iql_torchrl.cli import run_job  # noqa: E402
from iql_torchrl.data import buffer_transitions  # noqa: E402
from iql_torchrl.distributed import broadcast_parameters  # noqa: E402
from iql_torchrl.run import Run, offline_loop  # noqa: E402
from iql_torchrl.trainer import Config, offline_summary  # noqa: E402


def train(config: Config, given: set[str] | None = None) -> dict:
    # config: checked before any work; a resumed run takes its checkpoint's; the run folder is locked
    with Run.begin(config, job="offline", given=given) as run:
        if run.finished:
            return run.finished_summary()
        config, ctx = run.config, run.ctx
        # data: the Minari dataset with the preset's reward transform, as tensors on the training device
        data = buffer_transitions(run.load_data())
        # networks and loss: the paper's MLPs in IQLLoss (DiscreteIQLLoss for discrete actions), one per seed
        seeds = [config.seed + k for k in range(config.num_seeds)]
        loss = build_seed_losses(config, run.metadata, seeds, run.device)
        if ctx.enabled:  # torchrun: every process starts from rank 0's networks
            broadcast_parameters(loss)
        # update: V on its expectile loss, then the actor (AWR) and the critics with the new V, Adam,
        # the actor's cosine learning rate, the soft target update -- one call, eager or compiled
        update = make_update(config, loss, data, total_steps=config.steps, distributed=ctx.enabled)
        generators = batch_generators(seeds, ctx.rank, run.device)
        run.attach(loss, update, generators, seeds)  # a resumed run gets its saved state back here
        run.evaluate_if_pending()
        # loop: uniform batches of indices; log, checkpoint and evaluate when due
        offline_loop(run, update, index_sampler(generators, data.batch_size[0], config.batch_size, run.device), config.steps)
        # summary: summary.json and learning_curve.png in the run folder
        return run.finish(*offline_summary(run, update))


if __name__ == "__main__":
    sys.exit(run_job(Config, train))
