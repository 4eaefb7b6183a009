"""Offline IQL (Kostrikov, Nair & Levine, ICLR 2022) on a Minari dataset, in TorchRL's shape:
replay buffer → model → loss → update → a loop of sample, update, log, evaluate.

    python examples/iql_offline.py                      # the embedded default: a mixed Pendulum dataset
    python examples/iql_offline.py --temperature 0      # behaviour cloning on the same data
    python examples/iql_offline.py --dataset mujoco/hopper/medium-v0 --steps 1000000
    python examples/iql_offline.py --num-seeds 4       # 4 seeds at once, vmapped in one process
    python examples/iql_offline.py --sweep temperature=0,3 --num-seeds 2   # a grid of settings × seeds
    python examples/iql_offline.py --resume --output-dir runs/<run>   # continue a stopped run
    torchrun --nproc_per_node 2 examples/iql_offline.py  # data-parallel: 2 processes, batch 256 each
    python examples/iql_offline.py --help               # every setting (iql_torchrl.runs.config.OfflineConfig)

The run folder (``--output-dir``) receives checkpoint.pt, summary.json and learning_curve.png.
"""
import os

# before torch loads: idle OpenMP threads spin briefly, then sleep -- as fast alone as threads that
# spin, and two runs side by side don't starve each other (iql_torchrl.runs.threads); a user's own setting wins
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import sys  # noqa: E402

import torch  # noqa: E402

from iql_torchrl import DiscreteIQLLoss, IQLLoss, IQLUpdate, make_iql_networks  # noqa: E402
from iql_torchrl.data import OfflineDataMetadata, buffer_transitions  # noqa: E402
from iql_torchrl.jobs.cli import run_job  # noqa: E402
from iql_torchrl.objectives.ensemble import SeedEnsemble  # noqa: E402
from iql_torchrl.runs.builders import batch_generators, index_sampler, update_options  # noqa: E402
from iql_torchrl.runs.config import OfflineConfig  # noqa: E402
from iql_torchrl.runs.distributed import broadcast_parameters  # noqa: E402
from iql_torchrl.runs.run import Run  # noqa: E402
from iql_torchrl.runs.sweep import run_members  # noqa: E402


def make_loss(config: OfflineConfig, metadata: OfflineDataMetadata) -> IQLLoss:
    """The model and its loss: actor π(a|s), two critics Q(s, a) and the value network V(s), the
    paper's MLPs (2×256), in IQLLoss (DiscreteIQLLoss for discrete actions: one Q per action)."""
    actor, qvalue, value = make_iql_networks(metadata.observation_dim, metadata.action_dim,
                                             actor_kind=config.actor_kind(metadata),  # --actor: Gaussian by default
                                             hidden_sizes=config.hidden_sizes, actor_dropout=config.actor_dropout)
    # V: the τ-expectile of min Q̄(s, a) over dataset actions; actor: exp(β·(Q̄ − V)), clamped at 100, × −log π(a|s)
    hyperparameters = dict(expectile=config.expectile, temperature=config.temperature)
    if metadata.discrete:
        loss = DiscreteIQLLoss(actor, qvalue, value, action_space=metadata.actor_kind, **hyperparameters)
    else:
        loss = IQLLoss(actor, qvalue, value, **hyperparameters)
    loss.make_value_estimator(gamma=config.gamma)  # Q regresses to r + γ·(1 − terminated)·V(s')
    return loss


def train(config: OfflineConfig, given: set[str] | None = None) -> dict:
    """Trains ``config`` and returns the summary it writes to the run folder; ``given`` names the settings
    set on purpose (a resumed run refuses to change them)."""
    # the run: settings checked before any work (a resumed run takes its checkpoint's), the folder locked
    with Run.begin(config, job="offline", given=given) as run:
        if run.finished:
            return run.finished_summary()
        config = run.config

        # replay buffer: the Minari dataset (the preset's reward transform, --normalize-observations) in a TorchRL buffer
        replay_buffer = run.load_data()
        data = buffer_transitions(replay_buffer)  # its storage, on the training device

        # model and loss: one per member (each seed, for each setting of --sweep); several train at once, vmapped
        members = run_members(config)  # (the member's config, its seed)
        seeds = [seed for _, seed in members]
        losses = []
        for member_config, seed in members:
            torch.manual_seed(seed)
            losses.append(make_loss(member_config, run.metadata).to(run.device))
        loss = losses[0] if len(losses) == 1 else SeedEnsemble(losses)
        if run.ctx.enabled:  # torchrun: every process starts from rank 0's networks
            broadcast_parameters(loss)

        # update: V on its expectile loss first, then the actor and the critics with the new V; Adam
        # (the actor's learning rate on a cosine), the soft target update -- one call, eager or compiled
        update = IQLUpdate(loss, lr=config.lr, tau=config.tau, total_steps=config.steps, order=config.order,
                           data=data, **update_options(config, loss, distributed=run.ctx.enabled))

        # batches: uniform indices into the buffer, one stream per member (its seed's, and per torchrun rank)
        generators = batch_generators(seeds, run.ctx.rank, run.device)
        sample = index_sampler(generators, len(data), config.batch_size, run.device)
        run.attach(loss, update, generators, seeds)  # what checkpoints hold; a resumed run gets its state back
        run.evaluate_if_pending()

        # the loop: sample, update; log, checkpoint and evaluate when due
        for _ in run.updates(config.steps, update):
            metrics = update(sample())
            run.after_update(metrics)

        # summary: summary.json and learning_curve.png in the run folder
        return run.finish(*run.offline_summary(update))


if __name__ == "__main__":
    # Adam's moments of a unit whose gradient stays zero decay into subnormal floats and stay there (0.9 × the
    # smallest rounds back to it), and CPU arithmetic on subnormals is many times slower: flushed to zero, a
    # long run keeps its speed (docs/fused-step.md, "Long runs")
    torch.set_flush_denormal(True)
    sys.exit(run_job(OfflineConfig, train))
