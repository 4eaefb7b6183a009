"""Command line for the local dataset builders.

    python -m iql_torchrl.datasets list
    python -m iql_torchrl.datasets build ID [ID ...] [--episodes N] [--seed S] [--overwrite]
    python -m iql_torchrl.datasets build --all
    python -m iql_torchrl.datasets train-behaviour {hopper,walker2d,halfcheetah} FOLDER [--frames N]
    python -m iql_torchrl.datasets keep-policies {hopper,walker2d,halfcheetah} FOLDER [--medium-frames N] [--expert-frames N] [--episodes N]

Datasets are written under ``MINARI_DATASETS_PATH`` (default ``~/.minari/datasets``).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from iql_torchrl.datasets.behaviour import ENVIRONMENTS, SACSettings, train_behaviour
from iql_torchrl.datasets.locomotion import keep_policies
from iql_torchrl.datasets.builders import (
    BUILDERS,
    DEFAULT_DATASET,
    REFERENCE_EPISODES,
    _datasets_root,
    build_dataset,
    dataset_exists,
    dataset_id_problem,
)


def _list() -> int:
    print(f"datasets root: {_datasets_root()}")
    width = max(len(dataset_id) for dataset_id in BUILDERS)
    for dataset_id, recipe in BUILDERS.items():
        status = "built" if dataset_exists(dataset_id) else "-"
        default = "  (default)" if dataset_id == DEFAULT_DATASET else ""
        print(f"{dataset_id:<{width}}  {status:<5}  {recipe.describe()}{default}")
    return 0


def _build(args: argparse.Namespace) -> int:
    dataset_ids = sorted(BUILDERS) if args.all else args.dataset_ids
    if not dataset_ids:
        print("build: name at least one dataset id, or pass --all", file=sys.stderr)
        return 2
    unknown = [dataset_id for dataset_id in dataset_ids if dataset_id not in BUILDERS]
    if unknown:
        print(f"build: unknown dataset ids {unknown}; see `python -m iql_torchrl.datasets list`", file=sys.stderr)
        return 2
    unbuildable = {dataset_id: problem for dataset_id in dataset_ids if not dataset_exists(dataset_id)
                   and (problem := dataset_id_problem(dataset_id)) is not None}
    for dataset_id, problem in unbuildable.items():
        print(f"{dataset_id}: not built: {problem}", file=sys.stderr)
    if unbuildable and not args.all:
        return 2
    for dataset_id in dataset_ids:
        if dataset_id in unbuildable:
            continue
        try:
            dataset = build_dataset(
                dataset_id,
                episodes=args.episodes,
                seed=args.seed,
                overwrite=args.overwrite,
                reference_episodes=args.reference_episodes,
                progress=True,
            )
        except FileExistsError:
            print(f"{dataset_id}: already built, kept (--overwrite rebuilds it)", file=sys.stderr)
            continue
        metadata = dataset.storage.metadata
        print(
            f"{dataset_id}: {dataset.total_episodes} episodes, {dataset.total_steps} steps, "
            f"ref_min_score={metadata['ref_min_score']:.2f} (random), ref_max_score={metadata['ref_max_score']:.2f} "
            f"(expert) -> {dataset.storage.data_path.parent}"
        )
    return 0


def _at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value}: must be at least {minimum}")
        return value

    return parse


def _stop_requests() -> threading.Event:
    """Ctrl-C or SIGTERM sets the event (the training checkpoints after its round of updates and stops); a second
    one stops at once."""
    stop = threading.Event()

    def request(signum, frame):
        stop.set()
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, request)
    return stop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m iql_torchrl.datasets", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="list the builder dataset ids, their recipes and whether they are built")
    build = commands.add_parser("build", help="build datasets into MINARI_DATASETS_PATH")
    build.add_argument("dataset_ids", nargs="*", metavar="ID", help="builder dataset ids")
    build.add_argument("--all", action="store_true", help="build every builder dataset")
    build.add_argument("--episodes", type=_at_least(1), default=None, help="number of episodes (default: the recipe's)")
    build.add_argument("--seed", type=_at_least(0), default=0, help="episode i resets with seed SEED + i (default 0)")
    build.add_argument("--overwrite", action="store_true", help="replace an existing dataset with the same id")
    build.add_argument(
        "--reference-episodes", type=_at_least(1), default=REFERENCE_EPISODES,
        help=f"episodes per policy for ref_min_score/ref_max_score (default {REFERENCE_EPISODES})",
    )
    train = commands.add_parser("train-behaviour", help="train (or go on training) a SAC behaviour policy, with snapshots")
    train.add_argument("environment", choices=sorted(ENVIRONMENTS), help="the locomotion task")
    train.add_argument("folder", help="the training folder: snapshots, log, checkpoint and replay buffer")
    train.add_argument("--frames", type=_at_least(1), default=SACSettings.frames,
                       help=f"environment steps in all, those already trained included (default {SACSettings.frames})")
    train.add_argument("--seed", type=_at_least(0), default=0, help="the training's seed (default 0)")
    train.add_argument("--warmup-frames", type=_at_least(1), default=SACSettings.warmup_frames,
                       help=f"uniform-random frames before the first update (default {SACSettings.warmup_frames})")
    train.add_argument("--snapshot-every", type=_at_least(1), default=SACSettings.snapshot_every,
                       help=f"frames between two snapshots, a multiple of --frames-per-batch (default "
                            f"{SACSettings.snapshot_every})")
    train.add_argument("--frames-per-batch", type=_at_least(1), default=SACSettings.frames_per_batch,
                       help="frames collected between two rounds of updates, one update a frame (default "
                            f"{SACSettings.frames_per_batch})")
    keep = commands.add_parser("keep-policies", help="keep a training folder's medium, expert and medium-replay "
                               "snapshots in the package, for the locomotion datasets")
    keep.add_argument("environment", choices=sorted(ENVIRONMENTS), help="the locomotion task")
    keep.add_argument("folder", help="the training folder")
    keep.add_argument("--medium-frames", type=_at_least(1), default=None,
                      help="the medium snapshot (default: the first within 25%% of a third of the expert's return)")
    keep.add_argument("--expert-frames", type=_at_least(1), default=None,
                      help="the expert snapshot (default: the highest return)")
    keep.add_argument("--episodes", type=_at_least(0), default=10,
                      help="episodes that re-measure each snapshot's return before choosing (default 10; 0: the "
                           "training log's 5)")
    args = parser.parse_args(argv)
    if args.command == "list":
        return _list()
    if args.command == "train-behaviour":
        try:
            settings = SACSettings(frames=args.frames, seed=args.seed, warmup_frames=args.warmup_frames,
                                   snapshot_every=args.snapshot_every, frames_per_batch=args.frames_per_batch)
        except ValueError as error:
            parser.error(str(error))
        stop = _stop_requests()
        train_behaviour(args.environment, args.folder, settings, stop=stop.is_set)
        if stop.is_set():
            print(f"stopped; {args.folder} keeps a checkpoint: run the same command to go on", file=sys.stderr)
            return 130
        return 0
    if args.command == "keep-policies":
        try:
            kept = keep_policies(args.environment, args.folder, medium_frames=args.medium_frames,
                                 expert_frames=args.expert_frames, episodes=args.episodes)
        except (FileNotFoundError, ValueError) as error:
            print(f"keep-policies: {error}", file=sys.stderr)
            return 2
        for name in ("medium", "expert"):
            print(f"{name}: frame {kept[name]['frames']}, return {kept[name]['mean_return']} over "
                  f"{kept['evaluation_episodes'] or 'the log'}'s episodes (logged {kept[name]['logged_return']})")
        print(f"medium-replay: {len(kept['replay'])} snapshots before the medium one")
        return 0
    return _build(args)


if __name__ == "__main__":
    sys.exit(main())
