"""Data-parallel training across processes (gloo), and the offline job's seeds and processes end to end."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from filelock import FileLock
from tensordict import TensorDict

from synthetic import random_transitions

from iql_torchrl import IQLLoss, IQLUpdate, make_iql_networks
from iql_torchrl.runs.distributed import all_reduce_gradients

N, B, OBS, ACT, STEPS = 256, 16, 3, 2, 6


def dataset():
    return random_transitions(N, OBS, ACT)


def make_loss(seed):
    torch.manual_seed(seed)
    return IQLLoss(*make_iql_networks(OBS, ACT, hidden_sizes=(16, 16)))


def index_stream(seed, batch=B):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, N, (batch,), generator=g) for _ in range(STEPS)]


def flat_params(loss):
    return {k: v.detach().clone() for k, v in TensorDict.from_module(loss).items(True, True)}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, out_dir, mode):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    loss = make_loss(7)
    update = IQLUpdate(loss, data=dataset(), total_steps=STEPS, grad_hook=all_reduce_gradients, mode=mode)
    for idx in index_stream(0, batch=2 * B):  # each rank takes its half of the combined batch
        update(idx[rank * B : (rank + 1) * B])
    torch.save(flat_params(loss), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["eager", pytest.param("compile", marks=pytest.mark.slow)])
def test_two_gloo_processes_stay_identical_and_match_one_process_on_the_combined_batch(tmp_path, mode):
    # compiled, the all-reduce between the gradients and the optimizers is where the step may break
    port = _free_port()
    mp.start_processes(_rank_main, args=(2, port, str(tmp_path), mode), nprocs=2, join=True, start_method="spawn")
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    loss = make_loss(7)
    update = IQLUpdate(loss, data=dataset(), total_steps=STEPS)
    for idx in index_stream(0, batch=2 * B):
        update(idx)
    single = flat_params(loss)
    moved = [k for k in single if not torch.equal(single[k], flat_params(make_loss(7))[k])]
    assert moved  # the comparison is between trained parameters
    for key in single:
        assert torch.allclose(single[key], rank0[key], rtol=1e-5, atol=1e-6), key


# ------------------------------------------------------------------------------ through the trainer
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from iql_torchrl.runs.builders import load_actor  # noqa: E402
from iql_offline import train  # noqa: E402
from iql_torchrl.runs.config import OfflineConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(steps=12, batch_size=16, eval_every=12, eval_episodes=1, log_every=6, checkpoint_every=6,
            hidden_sizes=(16, 16), device="cpu", progress=False, logger="none")


def test_num_seeds_trains_each_seed_as_its_own_single_seed_run_would(tiny_datasets, tmp_path):
    together = train(OfflineConfig(dataset=tiny_datasets.pendulum, seed=5, num_seeds=2, output_dir=tmp_path / "k2", **TINY))
    assert [entry["seed"] for entry in together["per_seed"]] == [5, 6]
    assert together["normalized_score"] == pytest.approx(
        sum(entry["normalized_score"] for entry in together["per_seed"]) / 2
    )
    for k, seed in enumerate((5, 6)):
        train(OfflineConfig(dataset=tiny_datasets.pendulum, seed=seed, output_dir=tmp_path / f"s{seed}", **TINY))
        alone, _ = load_actor(tmp_path / f"s{seed}")
        in_ensemble, _ = load_actor(tmp_path / "k2", seed_index=k)
        for a, b in zip(alone.parameters(), in_ensemble.parameters()):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_num_seeds_with_torchrun_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="--num-seeds cannot be combined with torchrun"):
        train(OfflineConfig(num_seeds=2, output_dir=tmp_path / "run", **TINY))


@pytest.mark.slow
def test_torchrun_with_two_processes_writes_one_summary(tiny_datasets, tmp_path):
    out = tmp_path / "ddp"
    flags = ["--dataset", tiny_datasets.pendulum, "--steps", "12", "--batch-size", "16", "--eval-every", "12",
             "--eval-episodes", "1", "--checkpoint-every", "6", "--log-every", "6", "--hidden-sizes", "16", "16",
             "--device", "cpu", "--no-progress", "--logger", "none", "--output-dir", str(out)]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         str(ROOT / "examples" / "iql_offline.py"), *flags],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 32
    assert len(summary["per_seed"]) == 1 and summary["steps"] == 12
    assert [p.name for p in tmp_path.iterdir()] == ["ddp"]  # one run folder, written by rank 0
    # --precision auto: rank 0 chose (and said so, once), every process took its choice
    assert summary["precision"] == "fp32" and result.stderr.count("the update step computes in fp32") == 1

    def again(*more):
        return subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
             str(ROOT / "examples" / "iql_offline.py"), *flags, *more],
            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )

    # the folder is there: process 0 says why, process 1 stops with it (no lost connection in between)
    refused = again()
    assert refused.returncode != 0 and f"error: {out} already exists: pass --resume" in refused.stderr
    assert "error: process 0 could not start the run (its error says why)." in refused.stderr
    assert "Connection reset" not in refused.stderr and "gloo" not in refused.stderr.lower()
    finished = again("--resume")
    assert finished.returncode == 0 and finished.stderr.count("this run is finished") == 1
    # another run holds the folder: --resume stops every process with process 0's error (none waits for it)
    with FileLock(out / ".lock", timeout=0):
        in_use = again("--resume")
    assert in_use.returncode != 0 and f"error: {out} is in use by another run" in in_use.stderr
    assert "error: process 0 could not start the run (its error says why)." in in_use.stderr
    assert "Connection reset" not in in_use.stderr and "gloo" not in in_use.stderr.lower()


def _torchrun(*flags):
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         str(ROOT / "examples" / "iql_offline.py"), *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True,
    )


@pytest.mark.slow
def test_torchrun_run_killed_mid_way_resumes_to_the_same_final_parameters(tiny_datasets, tmp_path):
    import signal
    import time

    from iql_torchrl.runs.checkpoint import CHECKPOINT_NAME, load_checkpoint

    flags = ["--dataset", tiny_datasets.pendulum, "--steps", "300", "--batch-size", "16", "--eval-every", "300",
             "--eval-episodes", "1", "--checkpoint-every", "50", "--log-every", "50", "--hidden-sizes", "16", "16",
             "--device", "cpu", "--no-progress", "--logger", "none"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    reference = _torchrun(*flags, "--output-dir", str(straight))
    victim = _torchrun(*flags, "--output-dir", str(killed))
    deadline = time.time() + 300
    while time.time() < deadline:
        path = killed / CHECKPOINT_NAME
        if path.exists() and load_checkpoint(path)["step"] >= 100:
            break
        time.sleep(0.2)
    os.killpg(victim.pid, signal.SIGKILL)  # the launcher and both ranks
    victim.wait()
    assert 100 <= load_checkpoint(killed / CHECKPOINT_NAME)["step"] < 300
    resumed = _torchrun("--resume", "--output-dir", str(killed), "--no-progress")
    for proc in (reference, resumed):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    a, b = load_checkpoint(straight / CHECKPOINT_NAME), load_checkpoint(killed / CHECKPOINT_NAME)
    assert a["step"] == b["step"] == 300
    for key in a["loss"]:
        assert torch.equal(a["loss"][key], b["loss"][key]), key
